"""Where a running Trainer is: optimizer steps per epoch and the epochs a point of training names.

A callback's schedule is given in epochs (fractions allowed) or as shares of the run (``"50%"``, see
:func:`lightning_compress.core.checks.parse_epoch`); both are turned into optimizer steps here, one way for every
callback.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl

from lightning_compress.core.checks import epoch_share, resolve_epoch


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


def max_epochs(trainer: pl.Trainer) -> int | None:
    """The Trainer's ``max_epochs``, or ``None`` when training is bounded otherwise (``max_epochs=-1`` / steps)."""
    value = trainer.max_epochs
    return value if value is not None and value >= 0 else None


def resolve_epochs(trainer: pl.Trainer, owner: str, points: dict[str, float | str | None]) -> dict[str, float | None]:
    """Epochs of each named point (``None`` stays ``None``); shares of training are taken of ``max_epochs``.

    Raises:
        ValueError: A share is given but the Trainer has no ``max_epochs`` to take it of.
    """
    total = max_epochs(trainer)
    out: dict[str, float | None] = {}
    for name, value in points.items():
        if value is None:
            out[name] = None
            continue
        if epoch_share(value) is not None and total is None:
            raise ValueError(
                f"{owner}: `{name}`={value!r} is a share of training, which needs the Trainer's max_epochs "
                f"(got max_epochs={trainer.max_epochs}); give `{name}` in epochs, or set max_epochs."
            )
        out[name] = resolve_epoch(value, float(total or 0))
    return out
