"""The base of every compression callback: what a technique needs from a Trainer, written once.

A technique is a validated config (:mod:`lightning_compress.core.configs`), a verb that applies it to any module, and a
callback built on one of these bases, which decides only *when*:

* :class:`Technique` — the config, the identity on a Trainer (``state_key`` from ``include`` / ``exclude`` and
  :meth:`Technique._identity`), the module it is bound to (a weak reference, dropped when pickled for ``ddp_spawn``),
  the layer selection with the one frozen-layer policy (:meth:`Technique.select`), checkpoint state kept until training
  starts, and :meth:`Technique.restore` in a process that did not train (:class:`~lightning_compress.core.protocol.
  Restorable`).
* :class:`StepwiseTechnique` — acts once per optimizer step (not per batch under gradient accumulation): ``_step``.
* :class:`RampedTechnique` — a structure that tightens along a schedule from ``start_epoch`` to ``end_epoch`` and then
  holds (pruning masks, low ranks): the ramp, its update steps, its end as ``structure_final_epoch``, the logging
  cadence. A subclass implements :meth:`RampedTechnique._prepare` (select and check, before training),
  :meth:`RampedTechnique._update` (a new structure at a point of the ramp), :meth:`RampedTechnique._apply` (re-impose
  it after an optimizer step) and ``state_dict`` / :meth:`Technique._restore`.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress.core.checks import (
    Schedule,
    check_choice,
    check_flag,
    check_number,
    parse_epoch,
    same_kind_order,
)
from lightning_compress.core.configs import TechniqueConfig
from lightning_compress.core.selection import select_modules, settled
from lightning_compress.trainer.progress import (
    callback_state,
    check_optimizers,
    check_strategy,
    ramp_progress,
    ramp_steps,
    resolve_ramp,
    update_due,
    update_every,
    warn_if_spawned,
)


class Technique(Callback):
    """What every compression callback shares (see the module's docstring)."""

    #: What the callback holds that Lightning does not copy back from spawned processes (in the warning about it).
    holds = "state"

    def __init__(self, config: TechniqueConfig, finish_on_stop: bool = True) -> None:
        super().__init__()
        #: What the technique does (checked there, as its verb checks it); the callback adds only *when*.
        self.config = config
        #: Whether a run that ends before the target (EarlyStopping, max_time, max_steps, a stop signal) brings the
        #: model to it at the end of fit (see :meth:`on_train_end`).
        self.finish_on_stop = check_flag("finish_on_stop", finish_on_stop)
        #: After a fit that ended before the target: what was reached when it stopped, what was asked, and whether
        #: the target was then applied (``finish_on_stop``); ``None`` after a fit that reached it.
        self.stopped_short: dict[str, Any] | None = None
        self.include: Any = getattr(config, "include", None)
        self.exclude: Any = getattr(config, "exclude", None)
        self._bound: Any = None  # a weak reference to the module this callback compresses
        self._loaded: dict[str, Any] | None = None  # a checkpoint's state, kept until training starts

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    @override
    def state_key(self) -> str:
        # Two instances on one Trainer (e.g. on different layers) keep their states apart.
        return self._generate_state_key(include=self.include, exclude=self.exclude, **self._identity())

    def _identity(self) -> dict[str, Any]:
        """More settings that tell two instances apart in ``state_key`` (e.g. a pruning granularity)."""
        return {}

    def _bind(self, pl_module: pl.LightningModule) -> None:
        self._bound = weakref.ref(pl_module)

    def _bound_to(self, pl_module: pl.LightningModule) -> bool:
        return self._bound is not None and self._bound() is pl_module

    # ------------------------------------------------------------------ selection
    def filter_modules(self, pl_module: nn.Module) -> list[tuple[str, nn.Module]]:
        """The ``(name, module)`` pairs the technique acts on. Override for another selection."""
        return select_modules(pl_module, self.include, self.exclude, refuse_embeddings=self.config.embeddings_refused)

    def select(self, pl_module: nn.Module) -> list[tuple[str, nn.Module]]:
        """:meth:`filter_modules`, a weight tied to several layers kept once, and the one frozen-layer policy of every
        technique that rewrites weights while training: a layer whose weight does not train (``requires_grad=False``)
        is left as it is, named in one warning. Layers the techniques do not compress at all (embeddings, attention
        kernels' projections, a weight-bearing module of an unknown type) and layers tied to a selected one are named
        in another (:func:`~lightning_compress.core.selection.settled`).

        Raises:
            ValueError: Every selected layer is frozen (named).
        """
        selected, message = settled(pl_module, self.filter_modules(pl_module), self.config, self.name)
        if message is not None:
            rank_zero_warn(message)
        frozen = [n for n, m in selected if isinstance(w := getattr(m, "weight", None), Tensor) and not w.requires_grad]
        if frozen and len(frozen) == len(selected):
            raise ValueError(
                f"{self.name}: every selected layer is frozen (weight.requires_grad=False): "
                f"{', '.join(map(repr, frozen))}; a frozen layer is left as it is. Select trainable layers with "
                "`include` / `exclude`, or unfreeze them."
            )
        if frozen:
            rank_zero_warn(
                f"{self.name} leaves {len(frozen)} frozen layer(s) (weight.requires_grad=False) as they are: "
                f"{', '.join(map(repr, frozen))}. Unfreeze them to compress them."
            )
        return [(n, m) for n, m in selected if n not in frozen]

    # ------------------------------------------------------------------ the end of fit
    @property
    def target_reached(self) -> bool:
        """Whether the technique's target holds now (see :class:`~lightning_compress.CompressionTarget`); a technique
        that has no target (the default here) is always at it, and :meth:`on_train_end` has nothing to say."""
        return True

    def _goal(self) -> str:
        """The target, as messages name it (``"final_sparsity=0.9"``)."""
        raise NotImplementedError

    def _reached(self) -> str:
        """What holds now, in the target's terms (``"sparsity 0.633"``)."""
        raise NotImplementedError

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Bring the model to the target now (the final masks, ranks, clusters; quantization calibrated)."""
        raise NotImplementedError

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run that ended before the target (EarlyStopping, ``max_time``, ``max_steps``, a stop signal) is never left
        short silently: with ``finish_on_stop`` (default) the target is applied now, at the end of fit, with no
        fine-tuning after it; without, the model stays where it stopped. Either way one warning says what was reached
        against what was asked, and :attr:`stopped_short` records it (the app's report marks the job)."""
        self.stopped_short = None
        if not self._bound_to(pl_module) or self.target_reached:
            return
        reached, why = self._reached(), stop_reason(trainer)
        where = f"epoch {trainer.current_epoch}, optimizer step {trainer.global_step}"
        if self.finish_on_stop:
            self._finish(trainer, pl_module)
            rank_zero_warn(
                f"{self.name}: training stopped ({why}) at {where}, before {self._goal()} was reached ({reached}). "
                f"finish_on_stop=True applied the target at the end of fit ({self._reached()}) with no fine-tuning "
                "after it: evaluate the model before you keep it. To fine-tune at the target, let training run past "
                "the end of the schedule (EarlyStopping with a patience beyond it, or monitoring CompressionTarget's "
                "`<metric>_at_target`)."
            )
        else:
            rank_zero_warn(
                f"{self.name}: training stopped ({why}) at {where}, before {self._goal()} was reached ({reached}); "
                "finish_on_stop=False leaves the model there. Train past the end of the schedule, or set "
                "finish_on_stop=True to apply the target at the end of fit."
            )
        self.stopped_short = {"technique": self.name, "asked": self._goal(), "reached": reached, "why": why,
                              "finished": self.finish_on_stop, "now": self._reached()}  # fmt: skip

    # ------------------------------------------------------------------ checkpoints
    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: str | os.PathLike) -> None:
        """Rebuild this callback's state on ``pl_module`` from a checkpoint a run with it wrote — in a process that did
        not train: the user's process after ``strategy="ddp_spawn"`` (Lightning copies only the weights back to it),
        or a notebook reading a cluster job's checkpoint.

        Raises:
            ValueError: The checkpoint holds no state of this callback (another ``state_key``).
        """
        state = callback_state(checkpoint, self.state_key, self.name)
        self._bound = None
        self._restore_from(trainer, pl_module, checkpoint, state)

    def _restore_from(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: str | os.PathLike, state: dict[str, Any]
    ) -> None:
        """Prepare ``pl_module`` as for training and take the checkpoint's state (the weights are left as they are)."""
        self.setup(trainer, pl_module, "fit")
        self._restore(state)

    def _restore(self, state: dict[str, Any]) -> None:
        """Take a checkpoint's state (``state_dict``'s form) on the prepared model."""
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_bound"] = None  # a weak reference does not pickle (ddp_spawn pickles the Trainer's callbacks)
        return state


def stop_reason(trainer: pl.Trainer) -> str:
    """Why a fit ended, as the user would name it: the ``EarlyStopping`` that stopped it, ``max_time``, ``max_steps``,
    a callback's ``trainer.should_stop``, or the end of ``max_epochs``."""
    from lightning.pytorch.callbacks import EarlyStopping, Timer

    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
    for cb in callbacks:
        if isinstance(cb, EarlyStopping) and cb.stopped_epoch > 0:
            return f"EarlyStopping(monitor={cb.monitor!r}, patience={cb.patience})"
        if isinstance(cb, Timer) and cb.time_remaining() is not None and cb.time_remaining() <= 0:  # type: ignore[operator]
            return f"max_time={cb._duration:g} s"
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
        return f"max_steps={trainer.max_steps}"
    if trainer.should_stop or getattr(trainer, "received_sigterm", False):
        return "trainer.should_stop was set (a callback or a stop signal)"
    return f"max_epochs={trainer.max_epochs}"


class StepwiseTechnique(Technique):
    """A technique that acts after every optimizer step: ``_step(trainer, pl_module, step)`` is called once per
    optimizer step (not per batch under gradient accumulation)."""

    def __init__(self, config: TechniqueConfig, verbose: bool = False, finish_on_stop: bool = True) -> None:
        super().__init__(config, finish_on_stop)
        self.verbose = check_flag("verbose", verbose)
        self._last_seen_step = -1

    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, log: bool = True) -> None:
        raise NotImplementedError

    def _reset(self) -> None:
        """Forget every model-specific state (a new model is being compressed)."""
        self._loaded = None
        self._last_seen_step = -1

    def _new_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> bool:
        """For ``setup``: whether there is a new model to prepare — ``fit`` of a module this instance is not bound to
        (another ``fit`` of the same model goes on from the same state; a new one starts from its own weights). Then
        a strategy that shards parameters is refused and the per-model state is reset."""
        if stage != "fit" or self._bound_to(pl_module):
            return False
        check_strategy(trainer, self.name)
        self._reset()
        return True

    @staticmethod
    def _logging_step(trainer: pl.Trainer, step: int) -> bool:
        """Whether ``step`` is one of the Trainer's logging steps (``self.log`` costs about a millisecond per key: a
        technique logs on those, the only ones its loggers write, and whenever its structure changes)."""
        return step % max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1)) == 0

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_seen_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_seen_step = step
        self._step(trainer, pl_module, step)


class RampedTechnique(StepwiseTechnique):
    """A structure that tightens along a schedule (see the module's docstring).

    Args:
        config: The technique's config.
        start_epoch, end_epoch: Where the ramp starts and ends (epochs, fractions allowed, or shares like ``"50%"``).
        schedule: ``"cubic"`` or ``"linear"``.
        update_every_n_steps: Optimizer steps between structure updates along the ramp (``None``: 50 updates, at most
            one every 4 steps); the structure is re-imposed after every step.
        verbose: Print a line at every update (rank zero only).
        finish_on_stop: A run that ends before the ramp does gets the final structure at the end of fit (see
            :meth:`Technique.on_train_end`).
    """

    def __init__(
        self,
        config: TechniqueConfig,
        start_epoch: float | str,
        end_epoch: float | str,
        schedule: str,
        update_every_n_steps: int | None,
        verbose: bool,
        finish_on_stop: bool = True,
    ) -> None:
        super().__init__(config, verbose, finish_on_stop)
        self.start_epoch = parse_epoch("start_epoch", start_epoch)
        self.end_epoch = parse_epoch("end_epoch", end_epoch)
        same_kind_order(("start_epoch", self.start_epoch), ("end_epoch", self.end_epoch))
        self.schedule = check_choice("schedule", schedule, Schedule).value
        self.update_every_n_steps = check_number("update_every_n_steps", update_every_n_steps, 1, integer=True,
                                                 optional=True)  # fmt: skip
        self._epochs: dict[str, float] = {}  # start/end in epochs, once the Trainer's length is known
        self._reset()

    @override
    def _reset(self) -> None:
        super()._reset()
        self._last_update_step = -1
        self._start_step = self._end_step = self._every = 0

    # ------------------------------------------------------------------ what a subclass implements
    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Select and check the layers before training (everything that can be refused is refused here)."""
        raise NotImplementedError

    def _update(self, trainer: pl.Trainer, step: int) -> None:
        """A new structure for the ramp's point after optimizer step ``step``."""
        raise NotImplementedError

    def _apply(self) -> None:
        """Re-impose the current structure on the weights (after an optimizer step moved them)."""
        raise NotImplementedError

    def _log(self, pl_module: pl.LightningModule) -> None:
        """Log the measured structure (on logging steps and after every update)."""

    # ------------------------------------------------------------------ the ramp
    def should_update(self, step: int) -> bool:
        """Whether the structure is recomputed after optimizer step ``step``."""
        return update_due(step, self._start_step, self._end_step, self._every, self._last_update_step)

    def ramp_progress(self, step: int) -> float:
        """0 at the ramp's start, 1 at its end (clamped by the schedules)."""
        return ramp_progress(step, self._start_step, self._end_step)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._new_model(trainer, pl_module, stage):
            return
        self._prepare(trainer, pl_module)
        start, end = resolve_ramp(trainer, self.name, self.start_epoch, self.end_epoch, self._goal())
        self._epochs = {"start": start, "end": end}
        self._bind(pl_module)
        warn_if_spawned(trainer, self.name, self.holds)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_optimizers(trainer, pl_module, self.name)
        goal = self._goal()
        self._start_step, self._end_step = ramp_steps(trainer, self.name, self._epochs["start"], self._epochs["end"],
                                                      goal)  # fmt: skip
        self._every = update_every(self._start_step, self._end_step, self.update_every_n_steps)
        self._last_seen_step = trainer.global_step
        self._trace(trainer, pl_module)
        self._start(trainer, pl_module)

    def _trace(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """What must be traced on an input before the first update, and before a checkpoint's state is taken (e.g.
        channel groups); nothing by default."""

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """When training starts: a resumed run takes its checkpoint's structure (the weights carry it already), a new
        one its first (at the ramp's start)."""
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
            return
        self._step(trainer, pl_module, trainer.global_step, log=False)

    @override
    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, log: bool = True) -> None:
        updated = self.should_update(step)
        if updated:
            self._update(trainer, step)
            self._last_update_step = step
        self._apply()
        if log and self._last_update_step >= 0 and (updated or self._logging_step(trainer, step)):
            self._log(pl_module)

    @override
    def _restore_from(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: str | os.PathLike, state: dict[str, Any]
    ) -> None:
        self.setup(trainer, pl_module, "fit")
        self._trace(trainer, pl_module)
        self._restore(state)
        self._end_step = int(state.get("end_step", self._last_update_step))

    @property
    @override
    def target_reached(self) -> bool:
        """Whether the ramp has ended: the structure is final (see :class:`~lightning_compress.CompressionTarget`)."""
        return self._last_update_step >= 0 and self._last_update_step >= self._end_step

    @override
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update(trainer, self._end_step)
        self._last_update_step = self._end_step
        self._apply()

    def schedule_epochs(self) -> list[float]:
        """The ramp's start and end epochs (known after ``setup``); see
        :class:`~lightning_compress.core.protocol.HasSchedule`."""
        return list(self._epochs.values())

    @property
    def structure_final_epoch(self) -> float | None:
        """The epoch at which the ramp ends and the structure stops changing (known after ``setup``); see
        :class:`~lightning_compress.core.protocol.ChangesStructure`."""
        return self._epochs.get("end")
