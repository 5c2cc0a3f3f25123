"""Pruning without a Trainer: the masks :class:`~lightning_compress.MagnitudePruning` computes, applied once to any
``nn.Module`` as a :class:`~lightning_compress.PruningConfig` asks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.configs import PruningConfig, resolve_config
from lightning_compress.core.masks import GRADIENT_CRITERIA, check_nm_shapes, compute_masks, random_scores, sparsity
from lightning_compress.core.schedules import sparsity_at
from lightning_compress.core.selection import (
    check_overrides_match,
    distinct_weights,
    match_overrides,
    select_modules,
    weights_of,
)
from lightning_compress.pruning.groups import group_index, prune_groups, weight_masks

__all__ = ["compute_masks", "prune_", "sparsity", "sparsity_at"]


def prune_(
    model: nn.Module,
    config: PruningConfig | float | Mapping[str, Any] | None = None,
    *,
    example_input: Tensor | None = None,
    **fields: Any,
) -> dict[str, Tensor]:
    """Prune ``model`` once, in place, as ``config`` asks, and return the masks (layer name → bool keep-mask).

    The same selection, granularities, scopes and per-layer overrides as :class:`~lightning_compress.MagnitudePruning`
    at the end of its ramp: ``granularity="channel"`` removes Torch-Pruning's dependency groups (traced on
    ``example_input``), so that :func:`~lightning_compress.export_compact` cuts them out; a weight tied to several
    layers is pruned once.

    Args:
        model: Any module.
        config: A :class:`~lightning_compress.PruningConfig`, or the sparsity alone (``prune_(model, 0.5)``); keyword
            ``fields`` of the config are accepted too (and override it).
        example_input: One input batch, for ``granularity="channel"``.

    Raises:
        ValueError: What the config refuses (the same messages as the callback's), a gradient criterion (this
            one-shot form sees no gradients), a pattern that selects nothing, a layer N:M cannot divide.

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> masks = prune_(net, PruningConfig(final_sparsity=0.75))
        >>> sum(int((~m).sum()) for m in masks.values()) == round(0.75 * (16 * 16 + 16 * 4))
        True
    """
    cfg = resolve_config(PruningConfig, config, "final_sparsity", fields)
    if cfg.criterion in GRADIENT_CRITERIA:
        raise ValueError(
            f"prune_ prunes once and sees no gradients, but criterion={cfg.criterion!r} sums w·∂L/∂w over training "
            f"steps. Use MagnitudePruning(criterion={cfg.criterion!r}) while training, or criterion='magnitude' here."
        )
    selected = distinct_weights(select_modules(model, cfg.include, cfg.exclude))
    overrides = cfg.per_layer
    check_overrides_match(selected, overrides, "layer_sparsity")
    weights = weights_of(selected)
    gran = cfg.parsed_granularity
    if gran.kind == "channel":
        groups, keep = prune_groups(model, cfg, example_input)
        return weight_masks(weights, group_index(groups, keep))
    check_nm_shapes(weights, gran)
    scores = None
    if cfg.criterion == "random":
        generator = torch.Generator().manual_seed(cfg.seed)
        scores = {n: random_scores(w, generator) for n, w in weights.items()}
    own = {n: v for n in weights if (v := match_overrides(n, overrides, selected)) is not None}
    masks = compute_masks(
        weights,
        cfg.final_sparsity,
        granularity=gran,
        scope=str(cfg.scope),
        criterion=cfg.criterion,
        layer_sparsity=own,
        scores=scores,
        threshold=cfg.threshold,
    )
    with torch.no_grad():
        for name, mask in masks.items():
            weights[name].mul_(mask)
    return masks
