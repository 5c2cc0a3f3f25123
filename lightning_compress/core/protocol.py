"""How compression callbacks know about each other: two small protocols, never each other's classes.

* :class:`HasTarget` — a technique that reaches its compression target at some point of training
  (``target_reached``); :class:`~lightning_compress.CompressionTarget` waits for all of them.
* :class:`ChangesStructure` — a technique that changes *which* weights exist (pruning masks) until a known point of
  training (``structure_final_epoch``); quantization-aware training by default starts when every such technique on the
  Trainer has finished, so that the ranges it observes are those of the final structure.
* :class:`HasMasks` — a technique whose zeros must survive export (``masks``: layer name → keep-mask).
* :class:`HasFloatMode` — a technique that quantizes and can switch back to float for a while (``disabled()``).
* :class:`HasTeachers` — a technique that distils frozen teachers (``teachers``).
* :class:`RemovesChannels` — a technique whose zeroed channel groups the compact export can cut out (``groups``).
* :class:`Factorizes` — a technique whose low-rank layers the compact export replaces by two factors (``ranks``).
* :class:`Restorable` — a technique that rebuilds its state from a checkpoint in a process that did not train
  (``restore``): every base of :mod:`lightning_compress.trainer.technique` is one.

A new technique joins the coordination by having the attribute; nothing imports it by name.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class HasTarget(Protocol):
    """Reaches its compression target during training."""

    @property
    def target_reached(self) -> bool:
        """Whether the target holds now (masks at their final sparsity, layers quantizing, ...)."""
        ...


@runtime_checkable
class ChangesStructure(Protocol):
    """Changes which weights exist until ``structure_final_epoch`` (epochs, resolved against the Trainer)."""

    @property
    def structure_final_epoch(self) -> float | None:
        """The epoch from which the structure no longer changes (``None`` before the Trainer's length is known)."""
        ...


@runtime_checkable
class HasSchedule(Protocol):
    """Acts at points of training given in epochs; a run shorter than them compresses every technique's schedule into
    it (:func:`~lightning_compress.trainer.progress.scheduled_epoch_steps`)."""

    def schedule_epochs(self) -> list[float]:
        """The epochs of the schedule's points (resolved against the Trainer: known after ``setup``)."""
        ...


@runtime_checkable
class HasMasks(Protocol):
    """Holds keep-masks whose zeros an export must keep exactly."""

    @property
    def masks(self) -> dict[str, Tensor]:
        """Layer name → bool keep-mask."""
        ...


@runtime_checkable
class HasFloatMode(Protocol):
    """Quantizes the model, and can compute in float for a while (``with technique.disabled(): ...``). An app that
    finds one exports an integer model and compares it with the float one."""

    def disabled(self) -> AbstractContextManager[None]:
        """Within the block the model computes in float."""
        ...


@runtime_checkable
class HasTeachers(Protocol):
    """Distils frozen teachers into the model; an app reports their accuracy beside the student's."""

    @property
    def teachers(self) -> list[nn.Module]:
        """The frozen teacher modules."""
        ...


@runtime_checkable
class RemovesChannels(Protocol):
    """Zeroes whole channel groups; an app builds the compact network (``export_compact``) when ``groups`` is
    not empty."""

    @property
    def groups(self) -> list[Any]:
        """The channel groups (empty when the technique does not remove channels)."""
        ...


@runtime_checkable
class Factorizes(Protocol):
    """Keeps layers at low rank; an app builds the compact network (``export_compact(ranks=...)``) when ``ranks`` is
    not empty."""

    @property
    def ranks(self) -> dict[str, int]:
        """Layer name → rank of the layers to replace by two factors."""
        ...


@runtime_checkable
class Restorable(Protocol):
    """Rebuilds its state (masks, ranks, codebooks, quantizers) on a model from a checkpoint a run with it wrote, in a
    process that did not train (after ``ddp_spawn``, or in a notebook)."""

    def restore(self, trainer: Any, pl_module: nn.Module, checkpoint: str | os.PathLike) -> None:
        """Take the checkpoint's state for this technique onto ``pl_module``."""
        ...
