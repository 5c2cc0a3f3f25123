"""Gradual pruning: the MagnitudePruning callback and its Trainer-free form :func:`prune_`; channel groups removed
as a whole (:mod:`lightning_compress.pruning.groups`, :func:`prune_channel_groups_`; needs ``torch-pruning``).

Schedules and masks are pure functions in :mod:`lightning_compress.core.schedules` and
:mod:`lightning_compress.core.masks`.
"""

from lightning_compress.core.masks import compute_masks, parse_granularity
from lightning_compress.core.schedules import sparsity_at
from lightning_compress.pruning.callback import MagnitudePruning
from lightning_compress.pruning.functional import prune_
from lightning_compress.pruning.groups import prune_channel_groups_

__all__ = ["MagnitudePruning", "compute_masks", "parse_granularity", "prune_", "prune_channel_groups_", "sparsity_at"]
