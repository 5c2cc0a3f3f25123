"""Pruning without a Trainer: the same masks MagnitudePruning computes, applied once to any ``nn.Module``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_compress.core.masks import compute_masks, parse_granularity, sparsity
from lightning_compress.core.schedules import sparsity_at
from lightning_compress.core.selection import select_modules, weights_of

__all__ = ["compute_masks", "prune_", "sparsity", "sparsity_at"]


@torch.no_grad()
def prune_(
    model: nn.Module,
    sparsity: float,
    granularity: str = "unstructured",
    scope: str | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Prune ``model``'s Conv/Linear weights by magnitude once, in place, and return the masks.

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> masks = prune_(net, 0.75)
        >>> sum(int((~m).sum()) for m in masks.values()) == round(0.75 * (16 * 16 + 16 * 4))
        True
    """
    gran = parse_granularity(granularity)
    scope = scope or ("global" if gran.kind == "unstructured" else "layer")
    weights = weights_of(select_modules(model, include, exclude))
    masks = compute_masks(weights, sparsity, granularity=gran, scope=scope)
    for name, mask in masks.items():
        weights[name].mul_(mask)
    return masks
