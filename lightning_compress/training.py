"""Small facts about a running Trainer that several callbacks need, computed one way."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl


def check_epoch(name: str, value: Any) -> float:
    """A point of training in epochs (fractions allowed, >= 0), or a clear error naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"`{name}` must be a number of epochs >= 0 (fractions allowed), got {value!r}.")
    return float(value)


def optimizer_steps_per_epoch(trainer: pl.Trainer, owner: str) -> int:
    """Optimizer steps in one training epoch (batches over gradient-accumulation steps, rounded up).

    Raises:
        ValueError: The train dataloader has no length, so a schedule counted in epochs cannot be placed.
    """
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError(
            f"{owner} counts its schedule in epochs and needs a sized train dataloader (its length is unknown)."
        )
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))
