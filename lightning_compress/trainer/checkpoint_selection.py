"""Checkpoint selection that respects compression: pick the best epoch only among those at the target.

A plain ``ModelCheckpoint(monitor="val/acc")`` happily keeps an epoch from early in the pruning ramp, when the model
is still nearly dense and scores best. :class:`CompressionTarget` logs, after every validation,

* ``compress/at_target`` — 1.0 when every compression callback on the Trainer holds its target (the pruning ramp
  has ended, so the masks are at their final sparsity; quantization-aware training is quantizing), else 0.0;
* ``<monitor>_at_target`` — the monitored metric in those epochs, NaN in the others,

so that ``ModelCheckpoint(monitor="val/acc_at_target", mode="max")`` picks the best epoch at the target. Lightning's
ModelCheckpoint ranks NaN below every value, so an epoch before the target never displaces one at it; if no
validation ever ran at the target, its ``best_model_score`` stays ``-inf`` (``+inf`` for ``mode="min"``) and a
warning says so at the end of ``fit``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_compress.core.checks import Choice, check_choice
from lightning_compress.core.protocol import HasTarget


class Mode(Choice):
    """Whether a higher or a lower value of the monitored metric is better (as in ``ModelCheckpoint``)."""

    MAX = "max"
    MIN = "min"


FLAG = "compress/at_target"


def techniques_with_targets(trainer: pl.Trainer) -> list[Any]:
    """The callbacks on ``trainer`` that have a compression target (:class:`HasTarget`: ``target_reached``)."""
    return [cb for cb in trainer.callbacks if isinstance(cb, HasTarget)]  # type: ignore[attr-defined]


class CompressionTarget(Callback):
    """Log whether the compression target holds, and the monitored metric restricted to the epochs where it does.

    Args:
        monitor: The metric a ``ModelCheckpoint`` would monitor (logged by the module in validation).
        mode: ``"max"`` or ``"min"``, as in ``ModelCheckpoint``; only used for the warning's wording.

    Example:
        >>> from lightning.pytorch.callbacks import ModelCheckpoint
        >>> from lightning_compress import CompressionTarget, MagnitudePruning
        >>> callbacks = [
        ...     MagnitudePruning(final_sparsity=0.9, end_epoch=10),
        ...     CompressionTarget(monitor="val/acc"),
        ...     ModelCheckpoint(monitor="val/acc_at_target", mode="max", filename="best-at-target"),
        ... ]

    A run without any compression callback that has a target (e.g. distillation alone) is at its target in every
    epoch: there is nothing to wait for.
    """

    def __init__(self, monitor: str = "val/acc", mode: str = "max") -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"`monitor` must be the name of a logged metric, e.g. 'val/acc', got {monitor!r}.")
        mode = check_choice("mode", mode, Mode).value
        self.monitor, self.mode = monitor, mode
        self.key = f"{monitor}_at_target"
        self._validated = self._at_target_seen = False

    @property
    def state_key(self) -> str:
        return f"{type(self).__qualname__}{{'monitor': {self.monitor!r}}}"

    def at_target(self, trainer: pl.Trainer) -> bool:
        """Whether every compression callback on ``trainer`` holds its target now."""
        return all(cb.target_reached for cb in techniques_with_targets(trainer))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validated = self._at_target_seen = False

    def _check_logged(self, trainer: pl.Trainer) -> None:
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise KeyError(
                f"CompressionTarget(monitor={self.monitor!r}) found no {self.monitor!r} among the logged metrics "
                f"{sorted(metrics)}; log it in validation_step / on_validation_epoch_end, or pass one of those."
            )

    @override
    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The sanity check's validation steps run before the first training step: a metric that is never logged is
        # refused here rather than after the first epoch of training.
        self._check_logged(trainer)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics  # the epoch's values are there once the validation loop has ended
        self._check_logged(trainer)
        flag = self.at_target(trainer)
        logged = metrics[self.monitor]
        value = float(logged.detach().float().cpu()) if isinstance(logged, torch.Tensor) else float(logged)
        self._validated, self._at_target_seen = True, self._at_target_seen or flag
        # Logged like any metric: ModelCheckpoint (which runs at on_validation_end) and the loggers read them.
        pl_module.log(FLAG, float(flag), on_epoch=True)
        pl_module.log(self.key, value if flag else math.nan, on_epoch=True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._validated:
            rank_zero_warn(
                "CompressionTarget saw no validation during fit, so it logged nothing: it needs a validation loop "
                "(val_dataloader, limit_val_batches > 0)."
            )
        elif not self._at_target_seen:
            worst = "-inf" if self.mode == "max" else "+inf"
            rank_zero_warn(
                f"The compression target never held at a validation, so `{self.key}` is NaN in every epoch and a "
                f"ModelCheckpoint monitoring it keeps no epoch at the target (best_model_score {worst}). Lengthen "
                "training past the end of the pruning ramp / the start of quantization-aware training."
            )
