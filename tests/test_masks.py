import math

import pytest
import torch

from lightning_compress.core.masks import (
    channel_mask,
    compute_masks,
    global_unstructured_masks,
    nm_mask,
    parse_granularity,
    threshold_mask,
    unstructured_mask,
)


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(16, 8, 3, 3, generator=g),
        "b": torch.randn(32, 64, generator=g) * 0.1,
        "c": torch.randn(10, 32, generator=g) * 3,
    }


@pytest.mark.parametrize("s", [0.0, 0.5, 0.8, 0.9, 0.95, 0.98])
def test_unstructured_exact_count_and_smallest(s):
    w = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    mask = unstructured_mask(w.abs(), s)
    assert int((~mask).sum()) == round(s * 1000)
    if s > 0:
        assert w[~mask].abs().max() <= w[mask].abs().min()


def test_exact_count_with_ties():
    w = torch.zeros(100)
    w[:10] = 1.0
    assert int((~unstructured_mask(w.abs(), 0.5)).sum()) == 50


def test_global_ranks_across_layers(weights):
    scores = {k: v.abs() for k, v in weights.items()}
    masks = global_unstructured_masks(scores, 0.9)
    total = sum(v.numel() for v in weights.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.9 * total)
    # the small-valued layer "b" loses most, the large-valued "c" least
    fraction = {k: 1 - m.float().mean().item() for k, m in masks.items()}
    assert fraction["b"] > fraction["a"] > fraction["c"]
    pruned_max = max(weights[k][~m].abs().max() for k, m in masks.items())
    kept_min = min(weights[k][m].abs().min() for k, m in masks.items() if m.any())
    assert pruned_max <= kept_min


def test_previous_mask_is_kept(weights):
    w = weights["a"]
    first = unstructured_mask(w.abs(), 0.5)
    # pretend the weights changed so that pruned ones would now rank high: they must stay pruned
    changed = torch.where(first, w, torch.full_like(w, 100.0))
    second = unstructured_mask(changed.abs(), 0.7, previous=first)
    assert not (second & ~first).any()
    assert int((~second).sum()) == round(0.7 * w.numel())


def test_channel_mask_zeroes_whole_lowest_norm_filters(weights):
    w = weights["a"]
    mask = channel_mask(w.abs(), 0.25)
    dead = (~mask).reshape(16, -1)
    assert dead.all(dim=1).sum() == 4 and (dead.any(dim=1) == dead.all(dim=1)).all()
    norms = w.reshape(16, -1).norm(dim=1)
    assert norms[dead.all(dim=1)].max() <= norms[~dead.all(dim=1)].min()


def test_nm_mask_pattern(weights):
    w = weights["b"]
    mask = nm_mask(w.abs(), 2, 4)
    groups = mask.reshape(-1, 4)
    assert (groups.sum(dim=1) == 2).all()
    kept_min = torch.where(groups, w.abs().reshape(-1, 4), torch.inf).min(dim=1).values
    pruned_max = torch.where(~groups, w.abs().reshape(-1, 4), -torch.inf).max(dim=1).values
    assert (pruned_max <= kept_min).all()


def test_nm_partial_fraction(weights):
    mask = nm_mask(weights["b"].abs(), 2, 4, fraction=0.5)
    per_group = mask.reshape(-1, 4).sum(dim=1)
    assert int((per_group == 2).sum()) == 32 * 64 // 4 // 2 and set(per_group.tolist()) == {2, 4}


def test_nm_conv_groups_along_input(weights):
    mask = nm_mask(weights["a"].abs(), 1, 4)  # 8*3*3 = 72 input weights per filter
    assert (mask.reshape(16, 18, 4).sum(-1) == 3).all()


def test_nm_not_divisible():
    with pytest.raises(ValueError, match="input size 9 .* not a multiple of M=4"):
        nm_mask(torch.randn(4, 1, 3, 3), 2, 4)


def test_threshold_mask():
    w = torch.tensor([0.05, -0.2, 0.01, 0.3, -0.099])
    assert threshold_mask(w, 0.1).tolist() == [False, True, False, True, False]


def test_compute_masks_refuses_non_finite(weights):
    weights["b"][3, 3] = math.nan
    with pytest.raises(ValueError, match="layer 'b' holds non-finite weights"):
        compute_masks(weights, 0.5)


def test_compute_masks_layer_override(weights):
    masks = compute_masks(weights, 0.9, layer_sparsity={"c": 0.3})
    assert int((~masks["c"]).sum()) == round(0.3 * 320)
    pooled = weights["a"].numel() + weights["b"].numel()
    assert int((~masks["a"]).sum() + (~masks["b"]).sum()) == round(0.9 * pooled)


@pytest.mark.parametrize("bad", ["structured", "4:2", "2:2", "0:4", "2/4", ""])
def test_bad_granularity(bad):
    with pytest.raises(ValueError, match=r"`granularity` must be 'unstructured', 'channel' or 'N:M'"):
        parse_granularity(bad)
