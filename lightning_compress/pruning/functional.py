"""Pruning without a Trainer: the masks :class:`~lightning_compress.MagnitudePruning` computes, applied once to any
``nn.Module`` as a :class:`~lightning_compress.PruningConfig` asks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.compiled import accepts_compiled
from lightning_compress.core.configs import PruningConfig, resolve_config
from lightning_compress.core.masks import GRADIENT_CRITERIA, check_nm_shapes, compute_masks, sparsity
from lightning_compress.core.schedules import sparsity_at
from lightning_compress.core.selection import (
    check_overrides_match,
    select_for,
    weights_of,
)
from lightning_compress.pruning.strategies import PruningStrategy, strategy_for

__all__ = ["compute_masks", "prune_", "sparsity", "sparsity_at"]


@accepts_compiled()
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
    return pruned(model, resolve_config(PruningConfig, config, "final_sparsity", fields), example_input).masks


def pruned(model: nn.Module, config: PruningConfig, example_input: Tensor | None = None) -> PruningStrategy:
    """:func:`prune_`'s work: the callback's strategy for ``config``'s granularity, at the end of its ramp, applied
    once — one code path for both forms. Returns the strategy (its masks; for channel groups, ``groups`` and
    ``keep``)."""
    if config.criterion in GRADIENT_CRITERIA:
        raise ValueError(
            f"prune_ prunes once and sees no gradients, but criterion={config.criterion!r} sums w·∂L/∂w over training "
            f"steps. Use MagnitudePruning(criterion={config.criterion!r}) while training, or criterion='magnitude' "
            "here."
        )
    selected = select_for(model, config)
    check_overrides_match(selected, config.per_layer, "layer_sparsity")
    weights = weights_of(selected)
    check_nm_shapes(weights, config.parsed_granularity)
    strategy = strategy_for(config, selected, weights)
    strategy.build(example_input, model)
    strategy.update(None, config.final_sparsity, lambda final: final)
    with torch.no_grad():
        strategy.apply()
    return strategy
