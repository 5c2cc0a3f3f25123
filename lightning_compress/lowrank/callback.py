"""LowRankFactorization: weights constrained to low rank during training, factorized at export.

While training, every selected layer keeps its shape and its ``state_dict`` key; after every optimizer step its weight
is replaced by its best approximation of the current rank (truncated SVD). The ranks come from one global choice under
a budget (:func:`lightning_compress.core.lowrank.choose_ranks`) that tightens along a schedule.
:func:`~lightning_compress.export_compact` then replaces each such layer by its two factors and proves the result
equal.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
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
from lightning_compress.core.configs import BudgetName, LowRankConfig, ScheduleName
from lightning_compress.core.lowrank import (
    Budget,
    LowRankLayer,
    choose_ranks,
    normalized_spectrum,
    project_rank_,
    record_ranks,
)
from lightning_compress.core.schedules import sparsity_at
from lightning_compress.core.selection import weights_of
from lightning_compress.lowrank.functional import low_rank_layers
from lightning_compress.trainer.progress import (
    StepwiseTechnique,
    callback_state,
    check_optimizers,
    first_input,
    ramp_progress,
    ramp_steps,
    resolve_ramp,
    update_due,
    update_every,
    warn_if_spawned,
)
from lightning_compress.trainer.tables import log_table


class LowRankFactorization(StepwiseTechnique):
    r"""Low-rank factorization of a LightningModule's Linear and (ungrouped) convolution layers, reached gradually.

    Along the schedule (cubic by default, as :class:`~lightning_compress.MagnitudePruning`'s) the selected layers'
    budget shrinks from their dense cost to ``1/ratio`` of it at ``end_epoch``. At each update the ranks are chosen
    globally: singular values of all layers (each divided by its layer's norm) are ranked together and the largest kept
    until the budget is met; a layer whose rank would not save weights stays dense. After every optimizer step each
    layer's weight is projected onto its rank (truncated SVD), so the shapes and ``state_dict`` keys stay the user's
    and resume is exact. :func:`~lightning_compress.export_compact` (``ranks=callback.ranks``) replaces a Linear by two
    Linears and a k×k convolution by a k×k convolution to ``r`` channels followed by a 1×1, and proves them equal.

    ``start_epoch == end_epoch`` is the one-shot variant: the final ranks at that epoch, then fine-tuning at them.

    Args:
        ratio: The selected layers end with ``ratio``× fewer weights (``budget="params"``) or multiply-adds
            (``budget="flops"``); > 1.
        budget: ``"params"`` or ``"flops"`` (multiply-adds per sample, output positions traced on
            ``example_input_array`` or the first training batch).
        start_epoch, end_epoch: Where the ramp starts and ends (epochs, fractions allowed, or shares like ``"50%"``).
        schedule: ``"cubic"`` or ``"linear"``: how the removed share of the budget grows along the ramp.
        layer_rank: ``{pattern: rank}`` fixed ranks (patterns as in ``include``; a YAML file path works too), reached
            along the same ramp; between 1 and the layer's break-even rank (below which its factors are smaller). Their
            cost counts toward the budget.
        include, exclude: Regular expression(s) or ``@`` selectors choosing the Linear/Conv layers (default: all).
        update_every_n_steps: Optimizer steps between rank updates along the ramp (``None``: 50 updates, at most one
            every 4 steps). The projection itself happens after every step.
        verbose: Print a line at every rank update (rank zero only).

    Raises:
        ValueError: Before the first step: ``ratio`` ≤ 1, a budget that rank 1 in every layer cannot meet, a layer that
            cannot be factorized (grouped convolution, too thin), a ``layer_rank`` ≤ 0 or at/above the break-even, a
            pattern that matches nothing, a frozen layer selected.

    Example::

        low_rank = LowRankFactorization(ratio=4, include="classifier", end_epoch=12)
        trainer = pl.Trainer(max_epochs=20, callbacks=[low_rank])
        trainer.fit(model, datamodule)
        compact = export_compact(model, example)  # the layers carry their ranks: two small Linears, proven equal
    """

    def __init__(
        self,
        ratio: float = 4.0,
        budget: BudgetName = "params",
        start_epoch: float | str = 0.0,
        end_epoch: float | str = 10.0,
        schedule: ScheduleName = "cubic",
        layer_rank: dict[str, int] | str | os.PathLike | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        update_every_n_steps: int | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__()
        #: What is factorized (checked there, as low_rank_ checks it); the callback adds only *when*.
        self.config = LowRankConfig(ratio=ratio, budget=budget, layer_rank=layer_rank, include=include, exclude=exclude)
        self.ratio, self.budget = self.config.ratio, self.config.budget
        self.layer_rank: dict[str, int] = dict(cast(Mapping[str, int], self.config.layer_rank))
        self.start_epoch = parse_epoch("start_epoch", start_epoch)
        self.end_epoch = parse_epoch("end_epoch", end_epoch)
        same_kind_order(("start_epoch", self.start_epoch), ("end_epoch", self.end_epoch))
        self.schedule = check_choice("schedule", schedule, Schedule).value
        self.include, self.exclude = include, exclude
        self.update_every_n_steps = check_number("update_every_n_steps", update_every_n_steps, 1, integer=True,
                                                 optional=True)  # fmt: skip
        self.verbose = check_flag("verbose", verbose)
        self._epochs: dict[str, float] = {}
        self._bound: Any = None
        self._reset()

    def _reset(self) -> None:
        self._modules: dict[str, nn.Module] = {}
        self._weights: dict[str, Tensor] = {}
        self._layers: list[LowRankLayer] = []
        self._fixed: dict[str, int] = {}
        self._ranks: dict[str, int] = {}
        self._loaded: dict[str, Any] | None = None
        self._last_update_step = -1
        self._last_seen_step = -1
        self._keep = 1.0
        self._start_step = self._end_step = self._every = 0

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._new_model(trainer, pl_module, stage):
            return
        example = first_input(trainer, pl_module) if self.budget == Budget.FLOPS else None
        if isinstance(example, Tensor):
            example = example.to(pl_module.device)
        selected, self._layers, self._fixed = low_rank_layers(pl_module, self.config, example)
        self._modules = dict(selected)
        self._weights = weights_of(selected)
        frozen = [n for n, w in self._weights.items() if not w.requires_grad]
        if frozen:
            raise ValueError(
                f"LowRankFactorization: layer(s) {', '.join(map(repr, frozen))} are frozen (weight.requires_grad="
                "False); a projected frozen layer would lose its weights without training to recover. Leave them out "
                "with `exclude`."
            )
        start, end = resolve_ramp(trainer, "LowRankFactorization", self.start_epoch, self.end_epoch,
                                  f"ratio={self.ratio:g}")  # fmt: skip
        self._epochs = {"start": start, "end": end}
        self._bound = weakref.ref(pl_module)
        warn_if_spawned(trainer, "LowRankFactorization", "ranks")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_optimizers(trainer, pl_module, "LowRankFactorization")
        goal = f"ratio={self.ratio:g}"
        self._start_step, self._end_step = ramp_steps(
            trainer, "LowRankFactorization", self._epochs["start"], self._epochs["end"], goal
        )
        self._every = update_every(self._start_step, self._end_step, self.update_every_n_steps)
        self._last_seen_step = trainer.global_step
        if self._loaded is not None:
            self._restore(self._loaded)  # the checkpoint's weights are projected already: not again
            self._loaded = None
            return
        self._step(trainer, pl_module, trainer.global_step, log=False)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        rows = []
        for layer in self._layers:
            rank = self._ranks.get(layer.name, layer.full_rank)
            rows.append([layer.name, layer.rows, layer.cols, rank, layer.full_rank, layer.cost(rank),
                         layer.rows * layer.cols])  # fmt: skip
        columns = ["layer", "rows", "cols", "rank", "full_rank", "params", "dense_params"]
        log_table(trainer.loggers, "compress/ranks", columns, rows, trainer.default_root_dir)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"ranks": dict(self._ranks), "last_update_step": self._last_update_step, "keep": self._keep,
                "end_step": self._end_step}  # fmt: skip

    def restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: str | os.PathLike) -> None:
        """Read the ranks of a checkpoint a run with this callback wrote, in a process that did not train (after
        ``ddp_spawn``, or in a notebook). The weights are left as they are (they were projected when saved)."""
        state = callback_state(checkpoint, self.state_key, "LowRankFactorization")
        self._bound = None
        self.setup(trainer, pl_module, "fit")
        self._restore(state)
        self._end_step = int(state.get("end_step", self._last_update_step))

    # ------------------------------------------------------------------ internals
    def _restore(self, state: dict[str, Any]) -> None:
        ranks = {str(n): int(r) for n, r in state.get("ranks", {}).items()}
        unknown = set(ranks) - set(self._weights)
        if unknown:
            raise ValueError(
                f"The checkpoint's low-rank layers {sorted(unknown)} are not selected here (selected: "
                f"{sorted(self._weights)}). Use the include/exclude of the run that wrote it."
            )
        self._ranks = ranks
        record_ranks(self._modules, self.ranks)
        self._last_update_step = int(state.get("last_update_step", -1))
        self._keep = float(state.get("keep", 1.0))

    def scheduled_keep(self, step: int) -> float:
        """The share of the layers' dense cost the schedule allows after optimizer step ``step``."""
        progress = ramp_progress(step, self._start_step, self._end_step)
        return 1.0 - sparsity_at(progress, 0.0, 1.0 - 1.0 / self.ratio, self.schedule)

    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, log: bool = True) -> None:
        updated = update_due(step, self._start_step, self._end_step, self._every, self._last_update_step)
        if updated:
            self._update(trainer, step)
        self._apply()
        logging_step = step % max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1)) == 0
        if log and self._last_update_step >= 0 and (updated or logging_step):
            pl_module.log("compress/rank_ratio", self.ratio_reached(), on_step=True, on_epoch=False)

    @torch.no_grad()
    def _update(self, trainer: pl.Trainer, step: int) -> None:
        self._keep = self.scheduled_keep(step)
        progress = (1.0 - self._keep) / (1.0 - 1.0 / self.ratio)  # 0 at the ramp's start, 1 at its end
        fixed = {
            layer.name: max(
                self._fixed[layer.name], round(layer.full_rank * (1 - progress) + self._fixed[layer.name] * progress)
            )  # fmt: skip
            for layer in self._layers
            if layer.name in self._fixed
        }
        spectra = {layer.name: normalized_spectrum(self._weights[layer.name]).cpu() for layer in self._layers}
        try:
            ranks = choose_ranks(self._layers, spectra, self._keep, self.budget, fixed)
        except ValueError as err:
            raise RuntimeError(f"LowRankFactorization stopped training at optimizer step {step}: {err}") from err
        if trainer.world_size > 1:
            # Every rank holds the same weights under DDP; broadcasting rank zero's ranks makes agreement a guarantee.
            ranks = trainer.strategy.broadcast(ranks, src=0)
        full = {layer.name: layer.full_rank for layer in self._layers}
        self._ranks = {n: r for n, r in ranks.items() if r < full[n]}
        record_ranks(self._modules, self.ranks)  # the model carries them: export_compact(model, x) needs no ranks=
        self._last_update_step = step
        if self.verbose:
            rank_zero_info(
                f"LowRankFactorization: step {step}, budget {self._keep:.4f} of dense, ranks {self._ranks}, "
                f"{self.ratio_reached():.2f}x fewer {self.budget}"
            )

    @torch.no_grad()
    def _apply(self) -> None:
        for name, rank in self._ranks.items():
            project_rank_(self._weights[name], rank)

    # ------------------------------------------------------------------ read-outs
    @property
    def ranks(self) -> dict[str, int]:
        """Layer name → rank, for the layers that are factorized at export (rank below the break-even)."""
        by_name = {layer.name: layer for layer in self._layers}
        return {n: r for n, r in self._ranks.items() if r <= by_name[n].break_even}

    def ratio_reached(self) -> float:
        """The selected layers' dense cost over their cost at the current ranks (in the ``budget``'s unit)."""
        dense = sum(layer.cost(layer.full_rank, self.budget) for layer in self._layers)
        now = sum(layer.cost(self._ranks.get(layer.name, layer.full_rank), self.budget) for layer in self._layers)
        return dense / now if now else 1.0

    @property
    def target_reached(self) -> bool:
        """Whether the ramp has ended (the ranks are final); see :class:`~lightning_compress.CompressionTarget`."""
        return self._last_update_step >= self._end_step and self._last_update_step >= 0

    @property
    def structure_final_epoch(self) -> float | None:
        """The epoch from which the ranks no longer change (known after ``setup``)."""
        return self._epochs.get("end")

    @property
    def selected_layers(self) -> list[str]:
        """Names of the layers this callback constrains (known after ``setup``)."""
        return list(self._weights)
