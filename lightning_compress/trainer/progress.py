"""Where a running Trainer is: optimizer steps per epoch and the epochs a point of training names.

A callback's schedule is given in epochs (fractions allowed) or as shares of the run (``"50%"``, see
:func:`lightning_compress.core.checks.parse_epoch`); both are turned into optimizer steps here, one way for every
callback.
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_compress.core.checks import epoch_share, resolve_epoch, show_epoch


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


def debug_setting(trainer: pl.Trainer) -> str | None:
    """The Trainer flag that makes this run a smoke test whose length the user did not choose for the schedules
    (``fast_dev_run``, ``overfit_batches``: Lightning then sets ``max_epochs`` itself), as the user wrote it; else
    ``None``."""
    for flag in ("fast_dev_run", "overfit_batches"):  # set on the Trainer by Lightning's debugging flags
        if value := getattr(trainer, flag, None):
            return f"{flag}={value!r}"
    return None


def short_run(trainer: pl.Trainer) -> str | None:
    """The setting, as the user wrote it, that makes this a short run into which the techniques' schedules are
    compressed rather than refused: a debug flag (:func:`debug_setting`) or a ``max_steps`` that ends the run before
    ``max_epochs``; ``None`` when the run lasts the user's ``max_epochs`` (a schedule past it is refused)."""
    flag = debug_setting(trainer)
    if flag is not None:
        return flag
    steps, epochs = trainer.max_steps, trainer.max_epochs
    if steps is None or steps < 0:
        return None
    if epochs is None or epochs < 0 or steps < epochs * trainer.num_training_batches / trainer.accumulate_grad_batches:
        return f"max_steps={steps}"
    return None


def scheduled_epoch_steps(trainer: pl.Trainer, owner: str, schedule: str) -> float:
    """Optimizer steps one *scheduled* epoch takes in this run.

    The train loader's optimizer steps per epoch — unless the run is shorter than the schedules on its Trainer (a
    ``fast_dev_run`` / ``overfit_batches`` smoke test, a ``max_steps`` debug run: :func:`short_run`): then every
    schedule of every technique on the Trainer (:class:`~lightning_compress.core.protocol.HasSchedule`) is
    compressed into the run, in order, its last point on the run's last optimizer step, so that a short run executes
    each technique's whole path (ramps to their targets, quantization reached). Said once per technique and run
    (``owner``, whose ``schedule`` the line quotes) with the setting that made the run short: an info line under
    ``fast_dev_run`` / ``overfit_batches``, a warning where ``max_steps`` cut the user's schedule short. (A
    ``max_time`` run's length is unknown in advance: a technique that it stops short says so at the end of fit.)

    Raises:
        ValueError: The train dataloader has no length.
    """
    from lightning_compress.core.protocol import HasSchedule

    per_epoch = float(optimizer_steps_per_epoch(trainer, owner))
    total = trainer.estimated_stepping_batches
    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
    horizon = max((e for cb in callbacks if isinstance(cb, HasSchedule) for e in cb.schedule_epochs()), default=0.0)
    reason = short_run(trainer)
    # The last point on the last step at the latest: a quantization start there still quantizes one step.
    if reason is None or not math.isfinite(total) or horizon <= 0 or horizon * per_epoch <= total - 1:
        return per_epoch
    compressed = max(0.0, total - 1) / horizon
    said = trainer.__dict__.setdefault("_lightning_compress_short_run_said", set())
    if owner not in said:
        said.add(owner)
        line = (
            f"{owner}: {reason} runs {int(total)} optimizer step(s), fewer than the {horizon:g} epochs "
            f"the schedules on this Trainer span; {schedule} is compressed into the run (one scheduled epoch = "
            f"{compressed:.3g} steps), so that every step of the technique runs."
        )
        (rank_zero_info if debug_setting(trainer) else rank_zero_warn)(line)
    return compressed


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


def check_optimizers(trainer: pl.Trainer, pl_module: pl.LightningModule, owner: str) -> None:
    """Refuse a schedule counted in optimizer steps where ``trainer.global_step`` does not count them one per batch:
    manual optimization with several optimizers (each ``optimizer.step()`` advances it).

    Raises:
        ValueError: Manual optimization with more than one optimizer.
    """
    if not pl_module.automatic_optimization and len(trainer.optimizers) > 1:
        raise ValueError(
            f"{owner} counts its schedule in optimizer steps, but with manual optimization and "
            f"{len(trainer.optimizers)} optimizers trainer.global_step advances once per optimizer step, so the "
            "schedule would run too fast. Use one optimizer, or automatic optimization."
        )


#: Strategies whose sharded parameters the techniques cannot mask or quantize in place.
UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def check_strategy(trainer: pl.Trainer, owner: str) -> None:
    """Refuse strategies that shard parameters (FSDP, DeepSpeed, model parallel): a technique that rewrites whole
    weights in place would see only a shard of each.

    Raises:
        ValueError: The Trainer's strategy shards parameters.
    """
    name = type(trainer.strategy).__name__
    if any(cls.__name__ in UNSUPPORTED_STRATEGIES for cls in type(trainer.strategy).__mro__):
        raise ValueError(
            f"{owner} does not support strategy {name}: it shards parameters, and the technique rewrites whole "
            "weights in place. Use strategy='ddp' (or 'ddp_spawn'), which keeps a full copy of the model per device."
        )


def spawned(trainer: pl.Trainer) -> bool:
    """Whether the Trainer runs in processes it started by spawning or forking (``ddp_spawn``, ``ddp_fork``,
    ``ddp_notebook``): then only the weights come back to the process that called ``fit``."""
    return type(getattr(trainer.strategy, "launcher", None)).__name__ == "_MultiProcessingLauncher"


def warn_if_spawned(trainer: pl.Trainer, owner: str, what: str) -> None:
    """Say, once per run, that under a spawning strategy the caller's process gets the weights back but not the
    technique's ``what`` (Lightning copies weights only), and how to get them."""
    if spawned(trainer):
        rank_zero_warn(
            f"{owner} runs in processes started by strategy {type(trainer.strategy).__name__} "
            f"({trainer.strategy.launcher.__class__.__name__}): Lightning copies only the weights back to the process "
            f"that called fit, not the {what}. After fit, call `callback.restore(trainer, model, "
            "trainer.checkpoint_callback.last_model_path)` there (the lightning-compress app does), or use "
            "strategy='ddp'."
        )


def callback_state(checkpoint: str | os.PathLike, state_key: str, owner: str) -> dict[str, Any]:
    """The state a callback saved in a Lightning checkpoint.

    Raises:
        ValueError: The file is not a checkpoint, or holds no state under ``state_key``.
    """
    if not os.path.isfile(checkpoint):
        raise ValueError(f"{owner}.restore: no checkpoint at {os.fspath(checkpoint)!r}.")
    callbacks = torch.load(checkpoint, map_location="cpu", weights_only=True).get("callbacks", {})
    if state_key not in callbacks:
        raise ValueError(
            f"{owner}.restore: {os.fspath(checkpoint)!r} holds no state of this callback ({state_key}); it holds "
            f"{sorted(callbacks)}. Restore with the same include/exclude (and granularity) as the run that wrote it."
        )
    return dict(callbacks[state_key])


def structure_ends(trainer: pl.Trainer, owner: Callback) -> dict[str, float]:
    """The epoch at which each other callback on the Trainer that changes the structure (a pruning ramp:
    :class:`~lightning_compress.core.protocol.ChangesStructure`) has finished, one entry per instance: keyed by its
    class name, or by its ``state_key`` where several instances of one class are on the Trainer (two pruning callbacks
    on different layers end at different epochs, and both ends count)."""
    from lightning_compress.core.protocol import ChangesStructure

    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
    found = [
        (cb, end)
        for cb in callbacks
        if cb is not owner and isinstance(cb, ChangesStructure) and (end := cb.structure_final_epoch) is not None
    ]
    names = [type(cb).__name__ for cb, _ in found]
    return {(cb.state_key if names.count(type(cb).__name__) > 1 else type(cb).__name__): end for cb, end in found}


def resolve_ramp(
    trainer: pl.Trainer, owner: str, start: float | str | None, end: float | str | None, goal: str
) -> tuple[float, float]:
    """The epochs at which a ramp (``start_epoch`` → ``end_epoch``) starts and ends, once the Trainer's length is known.

    Raises:
        ValueError: ``start_epoch`` after ``end_epoch``, or ``end_epoch`` past ``max_epochs`` (the ramp would never
            reach ``goal``, named in the message).
    """
    epochs = resolve_epochs(trainer, owner, {"start_epoch": start, "end_epoch": end})
    first, last = epochs["start_epoch"], epochs["end_epoch"]
    assert first is not None and last is not None
    if first > last:
        raise ValueError(
            f"`start_epoch` ({show_epoch(start)}, epoch {first:g}) must not be after `end_epoch` "
            f"({show_epoch(end)}, epoch {last:g})."
        )
    check_within_max_epochs(trainer, owner, "end_epoch", end, last, f"the ramp would never reach {goal}")
    return first, last


def check_within_max_epochs(
    trainer: pl.Trainer, owner: str, name: str, value: float | str | None, epoch: float, why: str, strict: bool = False
) -> None:
    """Refuse a schedule point past the run's ``max_epochs`` when the user chose that length (under
    ``fast_dev_run`` / ``overfit_batches`` Lightning chose it, and the schedules are compressed into the run instead:
    :func:`scheduled_epoch_steps`). The message quotes the user's own settings.

    Raises:
        ValueError: ``epoch`` is past ``max_epochs`` (or at it, with ``strict``).
    """
    total = trainer.max_epochs
    if debug_setting(trainer) is not None or total is None or total < 0:
        return
    if epoch > total + 1e-9 or (strict and epoch >= total - 1e-9):
        shown = f"{value!r}" if isinstance(value, str) else f"{epoch:g}"
        bound = f"< {total}" if strict else f"<= {total}"
        raise ValueError(
            f"{owner}({name}={shown}) is past the end of Trainer(max_epochs={total}): {why}. Set {name} {bound}, or "
            "a longer max_epochs. (Under fast_dev_run / overfit_batches, or when max_steps ends the run first, the "
            "schedule is compressed into the run instead.)"
        )


def ramp_steps(trainer: pl.Trainer, owner: str, start: float, end: float, goal: str) -> tuple[int, int]:
    """The optimizer steps at which a ramp from epoch ``start`` to epoch ``end`` starts and ends (in a run shorter than
    the schedules, compressed into it: :func:`scheduled_epoch_steps`)."""
    steps_per_epoch = scheduled_epoch_steps(trainer, owner, f"its ramp to {goal} (epochs {start:g} -> {end:g})")
    return round(start * steps_per_epoch), round(end * steps_per_epoch)


def first_input(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """One input batch to trace the model on: ``example_input_array`` when the module has one, else the input of the
    first training batch, drawn from a fresh iterator without moving any random stream (shuffling draws from them)."""
    from lightning.pytorch.utilities.seed import isolate_rng

    example = getattr(pl_module, "example_input_array", None)
    if example is not None:
        return example
    loader = trainer.train_dataloader
    datamodule = getattr(trainer, "datamodule", None)
    if loader is None and datamodule is not None:
        loader = datamodule.train_dataloader()
    if loader is None:
        return None
    with isolate_rng():
        batch = next(iter(loader))
    return batch[0] if isinstance(batch, (tuple, list)) else batch


#: With ``update_every_n_steps=None`` a ramp's structure (masks, ranks) is updated this many times along it ...
DEFAULT_UPDATES_PER_RAMP = 50
#: ... but at most every this many optimizer steps: on a short ramp a mask update after every step cost 1.06-1.10x a
#: plain step (ResNet-20-style, benchmarks/step_time.py); re-applying the structure still happens after every step.
MIN_STEPS_BETWEEN_UPDATES = 4


def update_every(start: int, end: int, every: int | None) -> int:
    """Optimizer steps between structure updates along a ramp from step ``start`` to ``end`` (``every`` when given)."""
    return every or max(MIN_STEPS_BETWEEN_UPDATES, round((end - start) / DEFAULT_UPDATES_PER_RAMP))


def ramp_progress(step: int, start: int, end: int) -> float:
    """Where optimizer step ``step`` is on a ramp from step ``start`` to ``end``: 0 at its start, 1 at its end (1 for an
    empty ramp, a one-shot change; the schedules clamp values outside [0, 1])."""
    return 1.0 if end <= start else (step - start) / (end - start)


def update_due(step: int, start: int, end: int, every: int, last_update: int) -> bool:
    """Whether a ramp's structure is updated after optimizer step ``step``: at the ramp's start (or on entering it after
    a late start), every ``every`` steps along it, at its end, and once after it if its end was missed."""
    if step < start:
        return False
    if last_update < 0:
        return True
    if step <= end:
        return (step - start) % every == 0 or step == end
    return last_update < end
