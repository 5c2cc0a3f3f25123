"""Gradual magnitude pruning: schedules and masks (pure) and the MagnitudePruning callback."""

from lightning_compress.pruning.callback import MagnitudePruning
from lightning_compress.pruning.masks import compute_masks, parse_granularity
from lightning_compress.pruning.schedules import sparsity_at

__all__ = ["MagnitudePruning", "compute_masks", "parse_granularity", "sparsity_at"]
