"""Pruning masks from weights. Pure functions on tensors: no Lightning, no module surgery.

A mask is a ``bool`` tensor shaped like the weight: ``True`` keeps a weight, ``False`` zeroes it.
Every ranking function takes the *scores* of the weights (``|w|`` for magnitude pruning, fixed random
numbers for random pruning) and optionally the ``previous`` mask: weights already pruned rank first, so
masks only ever grow more sparse (a pruned weight is not revived by a later update), and the number of
zeros is exact — ``round(sparsity * n)`` — whatever ties the scores hold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_compress.core.checks import Criterion, Scope, check_choice


@dataclass(frozen=True)
class Granularity:
    """A parsed granularity: ``unstructured``, ``channel`` or ``N:M`` (N of every M weights zeroed)."""

    kind: str
    n: int = 0
    m: int = 0

    @property
    def max_sparsity(self) -> float:
        """The highest sparsity this granularity can reach (``N/M`` for N:M, else just below 1)."""
        return self.n / self.m if self.kind == "nm" else 1.0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind


def parse_granularity(value: str) -> Granularity:
    """Parse ``"unstructured"``, ``"channel"`` or ``"N:M"`` (e.g. ``"2:4"``, with 0 < N < M).

    Example:
        >>> parse_granularity("2:4")
        Granularity(kind='nm', n=2, m=4)
    """
    if value in ("unstructured", "channel"):
        return Granularity(value)
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(value))
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if 0 < n < m:
            return Granularity("nm", n, m)
    raise ValueError(
        f"`granularity` must be 'unstructured', 'channel' or 'N:M' with 0 < N < M (e.g. '2:4'), got {value!r}."
    )


def magnitude_scores(weight: Tensor) -> Tensor:
    """Scores for magnitude pruning: ``|w|`` in float32 (detached)."""
    return weight.detach().abs().float()


#: Criteria whose scores accumulate from gradients during training (first-order Taylor, movement).
GRADIENT_CRITERIA = ("taylor", "movement")


def gradient_term(product: Tensor, criterion: str, channels: bool = False) -> Tensor:
    """One optimizer step's addition to a score, from ``product`` = ``w · ∂L/∂w`` (per weight, or summed per channel):
    ``|w·g|`` for ``"taylor"`` (Molchanov et al. 2019: the first-order estimate of the loss change when the weight is
    removed) and ``−w·g`` for ``"movement"`` (Sanh et al. 2020: positive while training moves the weight away from
    zero). For channels (``channels=True``: ``product`` summed over each channel's coupled weights) Taylor squares the
    sum, as Molchanov et al. do for a filter.

    Example:
        >>> w, g = torch.tensor([0.5, -0.5, 0.1]), torch.tensor([-1.0, -1.0, 2.0])
        >>> gradient_term(w * g, "taylor"), gradient_term(w * g, "movement")
        (tensor([0.5000, 0.5000, 0.2000]), tensor([ 0.5000, -0.5000, -0.2000]))
    """
    if criterion == "taylor":
        return product.square() if channels else product.abs()
    return -product


def random_scores(weight: Tensor, generator: torch.Generator) -> Tensor:
    """Scores for random pruning: uniform numbers drawn once from ``generator`` (seeded, so reproducible)."""
    return torch.rand(weight.shape, generator=generator, dtype=torch.float32).to(weight.device)


def _rank_first(scores: Tensor, previous: Tensor | None) -> Tensor:
    """Scores with already-pruned entries sent to -inf so they are pruned first."""
    scores = scores.float()
    if previous is None:
        return scores
    return scores.masked_fill(~previous, -math.inf)


def _keep_all_but_smallest(flat_scores: Tensor, k: int, previous: Tensor | None = None) -> Tensor:
    """Keep-mask that drops the ``k`` smallest scores; entries dropped in ``previous`` are dropped first.

    Only the entries still kept are ranked, and the smaller side is selected (the k smallest, or the n − k
    largest), so a mask update at high sparsity costs a small ``topk`` rather than a full ranking.
    """
    if previous is None:
        candidates, keep = None, torch.ones_like(flat_scores, dtype=torch.bool)
    else:
        candidates, keep = previous.nonzero().squeeze(1), previous.clone()
    scores = flat_scores if candidates is None else flat_scores[candidates]
    k = k - (flat_scores.numel() - scores.numel())  # how many more to drop
    if k <= 0:
        return keep
    n = scores.numel()
    if k >= n:
        keep.fill_(False)
        return keep
    if k <= n // 2:
        drop = torch.topk(scores, k, largest=False, sorted=False).indices
        keep[drop if candidates is None else candidates[drop]] = False
    else:
        stay = torch.topk(scores, n - k, largest=True, sorted=False).indices
        if candidates is None:
            keep.fill_(False)
            keep[stay] = True
        else:
            keep[candidates] = False
            keep[candidates[stay]] = True
    return keep


def _count(sparsity: float, n: int) -> int:
    return min(n, int(round(sparsity * n)))


def unstructured_mask(scores: Tensor, sparsity: float, previous: Tensor | None = None) -> Tensor:
    """Zero exactly ``round(sparsity * numel)`` entries: those with the smallest scores.

    Example:
        >>> unstructured_mask(torch.tensor([0.3, -2.0, 0.1, 1.0]).abs(), 0.5)
        tensor([False,  True, False,  True])
    """
    flat = scores.float().flatten()
    prev = None if previous is None else previous.flatten()
    return _keep_all_but_smallest(flat, _count(sparsity, flat.numel()), prev).view(scores.shape)


def global_unstructured_masks(
    scores: Mapping[str, Tensor], sparsity: float, previous: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """One ranking across all layers: exactly ``round(sparsity * total)`` zeros among all of them."""
    names = list(scores)
    flats = [scores[n].float().flatten() for n in names]
    flat = torch.cat([f.to(flats[0].device) for f in flats])
    prev = None
    if previous and any(n in previous for n in names):
        prev = torch.cat(
            [
                previous[n].flatten().to(flat.device)
                if n in previous
                else torch.ones(f.numel(), dtype=torch.bool, device=flat.device)
                for n, f in zip(names, flats, strict=True)
            ]
        )
    keep = _keep_all_but_smallest(flat, _count(sparsity, flat.numel()), prev)
    out, offset = {}, 0
    for name, f in zip(names, flats, strict=True):
        out[name] = keep[offset : offset + f.numel()].view(scores[name].shape).to(scores[name].device)
        offset += f.numel()
    return out


def channel_mask(scores: Tensor, sparsity: float, previous: Tensor | None = None) -> Tensor:
    """Zero whole output channels (dim 0: Conv filters, Linear rows) ranked by the L2 norm of their scores.

    ``round(sparsity * channels)`` channels are zeroed; the sparsity over weights is then exactly that
    fraction too, since every channel holds as many weights.
    """
    channels = scores.shape[0]
    norms = scores.float().reshape(channels, -1).norm(dim=1)
    if previous is not None:
        norms = norms.masked_fill(~previous.reshape(channels, -1).any(dim=1), -math.inf)
    keep_channel = _keep_all_but_smallest(norms, _count(sparsity, channels))
    return keep_channel.view(-1, *([1] * (scores.dim() - 1))).expand_as(scores).clone()


def nm_groups(shape: torch.Size | tuple[int, ...], m: int) -> int:
    """Number of N:M groups in a weight of ``shape``; raises if the input size is not a multiple of M."""
    row = math.prod(shape[1:])
    if row % m:
        raise ValueError(f"input size {row} (weight shape {tuple(shape)}) is not a multiple of M={m}")
    return shape[0] * row // m


def check_nm_shapes(weights: Mapping[str, Tensor], granularity: Granularity) -> None:
    """Refuse an N:M granularity for a layer whose input size is no multiple of M (named, with the way out)."""
    if granularity.kind != "nm":
        return
    refused = {}
    for name, weight in weights.items():
        try:
            nm_groups(weight.shape, granularity.m)
        except ValueError as err:
            refused[name] = str(err)
    if refused:
        first, why = next(iter(refused.items()))
        patterns = [f"^{re.escape(name)}$" for name in refused]
        raise ValueError(
            f"granularity='{granularity}' cannot prune {len(refused)} layer(s) whose input size is no multiple of "
            f"{granularity.m} ({first!r}: {why}): {', '.join(map(repr, refused))}. Leave them out with "
            f"exclude={patterns!r}."
        )


def nm_mask(scores: Tensor, n: int, m: int, fraction: float = 1.0, previous: Tensor | None = None) -> Tensor:
    """N:M mask: in each group of M consecutive input weights of an output row, the N smallest are zero.

    The input weights of an output channel are taken in memory order (``weight.reshape(out, -1)``: for a
    Conv2d ``in × kh × kw``). ``fraction`` < 1 applies the pattern to that fraction of the groups only —
    those whose N smallest scores sum lowest — which lets a schedule ramp towards full N:M sparsity.
    """
    groups = nm_groups(scores.shape, m)
    ranked = _rank_first(scores, previous).reshape(groups, m)
    smallest = torch.topk(ranked, n, dim=1, largest=False, sorted=False)
    keep = torch.ones_like(ranked, dtype=torch.bool)
    group_keep = _keep_all_but_smallest(smallest.values.sum(dim=1), _count(fraction, groups))
    pruned_groups = (~group_keep).nonzero().squeeze(1)
    keep[pruned_groups.unsqueeze(1), smallest.indices[pruned_groups]] = False
    return keep.view(scores.shape)


def threshold_mask(weight: Tensor, threshold: float, previous: Tensor | None = None) -> Tensor:
    """Zero every weight with ``|w| < threshold`` (and keep earlier zeros)."""
    keep = weight.detach().abs() >= threshold
    return keep if previous is None else keep & previous


def sparsity(tensors: Tensor | Mapping[str, Tensor]) -> float:
    """Fraction of exactly-zero entries over one tensor or all tensors of a mapping (masks count False)."""
    items = [tensors] if isinstance(tensors, Tensor) else list(tensors.values())
    total = sum(t.numel() for t in items)
    if total == 0:
        return 0.0
    nonzero = sum(int(torch.count_nonzero(t)) for t in items)
    return 1.0 - nonzero / total


def _check_finite(weights: Mapping[str, Tensor]) -> None:
    # One pass over all layers together; the per-layer scan runs only to name the culprit.
    device = next(iter(weights.values())).device
    if bool(torch.isfinite(torch.cat([w.detach().flatten().to(device) for w in weights.values()])).all()):
        return
    for name, weight in weights.items():
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(
                f"layer {name!r} holds non-finite weights (NaN or inf); refusing to compute a pruning mask "
                "from them. The run diverged: lower the learning rate or add gradient clipping."
            )


def compute_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    *,
    granularity: str | Granularity = "unstructured",
    scope: str = "global",
    criterion: str = "magnitude",
    layer_sparsity: Mapping[str, float] | None = None,
    previous: Mapping[str, Tensor] | None = None,
    scores: Mapping[str, Tensor] | None = None,
    threshold: float | None = None,
) -> dict[str, Tensor]:
    """Masks for several named weights at one target sparsity.

    Args:
        weights: Layer name → weight tensor.
        sparsity: Target fraction of zeros. With ``scope="global"`` (unstructured only) it holds over all
            layers together; with ``"layer"`` it holds in every layer.
        granularity: ``"unstructured"``, ``"channel"`` or ``"N:M"``.
        scope: ``"global"`` or ``"layer"``.
        criterion: ``"magnitude"`` ranks by ``|w|``; ``"random"``, ``"taylor"`` and ``"movement"`` rank by
            ``scores`` (required then: fixed random numbers, or scores accumulated from gradients, see
            :func:`gradient_term`); ``"threshold"`` zeroes every ``|w| < threshold`` and ignores ``sparsity``.
        layer_sparsity: Layer name → its own target; those layers are ranked on their own, not globally.
        previous: Earlier masks; weights pruned there stay pruned.
        scores: Precomputed scores (for ``"random"``, ``"taylor"``, ``"movement"``), layer name → tensor.
        threshold: The magnitude threshold for ``criterion="threshold"``.

    Raises:
        ValueError: A weight holds NaN or inf (masks are never computed from them), or an N:M group size
            does not divide a layer's input size.
    """
    gran = parse_granularity(granularity) if isinstance(granularity, str) else granularity
    _check_finite(weights)
    prev = previous or {}
    criterion = check_choice("criterion", criterion, Criterion)
    scope = check_choice("scope", scope, Scope)
    if criterion == "threshold":
        if threshold is None:
            raise ValueError("criterion='threshold' needs a `threshold`.")
        return {n: threshold_mask(w, threshold, prev.get(n)) for n, w in weights.items()}
    if criterion in ("random", *GRADIENT_CRITERIA):
        if scores is None:
            raise ValueError(f"criterion={criterion.value!r} needs precomputed `scores`.")
        layer_scores = {n: scores[n] for n in weights}
    else:
        layer_scores = {n: magnitude_scores(w) for n, w in weights.items()}

    own = dict(layer_sparsity or {})
    masks: dict[str, Tensor] = {}
    if gran.kind == "unstructured" and scope == "global":
        pooled = {n: s for n, s in layer_scores.items() if n not in own}
        if pooled:
            masks.update(global_unstructured_masks(pooled, sparsity, {n: prev[n] for n in pooled if n in prev}))
    for name, layer_score in layer_scores.items():
        if name in masks:
            continue
        target = own.get(name, sparsity)
        if gran.kind == "unstructured":
            masks[name] = unstructured_mask(layer_score, target, prev.get(name))
        elif gran.kind == "channel":
            masks[name] = channel_mask(layer_score, target, prev.get(name))
        else:
            masks[name] = nm_mask(layer_score, gran.n, gran.m, target / gran.max_sparsity, prev.get(name))
    return masks
