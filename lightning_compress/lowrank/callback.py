"""LowRankFactorization: weights constrained to low rank during training, factorized at export.

While training, every selected layer keeps its shape and its ``state_dict`` key; after every optimizer step its weight
is replaced by its best approximation of the current rank (truncated SVD). The ranks come from one global choice under
a budget (:func:`lightning_compress.core.lowrank.choose_ranks`) that tightens along a schedule.
:func:`~lightning_compress.export_compact` then replaces each such layer by its two factors and proves the result
equal.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

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
from lightning_compress.trainer.progress import first_input
from lightning_compress.trainer.tables import log_table
from lightning_compress.trainer.technique import RampedTechnique


class LowRankFactorization(RampedTechnique):
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
        start_epoch: Where the ramp starts (epochs, fractions allowed, or shares like ``"50%"``).
        end_epoch: Where the ramp ends (the same units).
        schedule: ``"cubic"`` or ``"linear"``: how the removed share of the budget grows along the ramp.
        layer_rank: ``{pattern: rank}`` fixed ranks (patterns as in ``include``; a YAML file path works too), reached
            along the same ramp; between 1 and the layer's break-even rank (below which its factors are smaller). Their
            cost counts toward the budget.
        include: Regular expression(s) or ``@`` selectors choosing the Linear/Conv layers (default: all).
        exclude: The layers left out of ``include``'s choice (the same kinds of patterns).
        update_every_n_steps: Optimizer steps between rank updates along the ramp (``None``: 50 updates, at most one
            every 4 steps). The projection itself happens after every step.
        verbose: Print a line at every rank update (rank zero only).
        finish_on_stop: When training stops before the ramp reaches ``ratio`` (EarlyStopping, ``max_time``,
            ``max_steps``), apply the final ranks at the end of fit (default); ``False`` leaves the model where it
            stopped. Either way a warning says what was reached against what was asked.

    Raises:
        ValueError: Before the first step: ``ratio`` ≤ 1, a budget that rank 1 in every layer cannot meet, a layer that
            cannot be factorized (too thin; only grouped convolutions selected — among other layers they are left as
            they are, named in one warning), a ``layer_rank`` ≤ 0 or at/above the break-even, a
            pattern that matches nothing, every selected layer frozen (a frozen one alone is left dense, named).

    Example::

        low_rank = LowRankFactorization(ratio=4, include="classifier", end_epoch=12)
        trainer = pl.Trainer(max_epochs=20, callbacks=[low_rank])
        trainer.fit(model, datamodule)
        compact = export_compact(model, example)  # the layers carry their ranks: two small Linears, proven equal
    """

    holds = "ranks"

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
        finish_on_stop: bool = True,
    ) -> None:
        config = LowRankConfig(ratio=ratio, budget=budget, layer_rank=layer_rank, include=include, exclude=exclude)
        super().__init__(config, start_epoch, end_epoch, schedule, update_every_n_steps, verbose, finish_on_stop)
        self.config: LowRankConfig = config
        self.ratio, self.budget = config.ratio, config.budget
        self.layer_rank: dict[str, int] = config.per_layer

    @override
    def _reset(self) -> None:
        super()._reset()
        self._modules: dict[str, nn.Module] = {}
        self._weights: Mapping[str, Tensor] = {}
        self._layers: list[LowRankLayer] = []
        self._fixed: dict[str, int] = {}
        self._ranks: dict[str, int] = {}
        self._keep = 1.0

    @override
    def _goal(self) -> str:
        return f"ratio={self.ratio:g}"

    @override
    def _reached(self) -> str:
        return f"{self.ratio_reached():.2f}x fewer {self.budget}"

    # ------------------------------------------------------------------ the ramp's steps
    @override
    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        example = first_input(trainer, pl_module) if self.budget == Budget.FLOPS else None
        if isinstance(example, Tensor):
            example = example.to(pl_module.device)
        selected, self._layers, self._fixed = low_rank_layers(pl_module, self.config, example, self.select(pl_module))
        self._modules = dict(selected)
        self._weights = weights_of(selected)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
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

    @override
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
        return 1.0 - sparsity_at(self.ramp_progress(step), 0.0, 1.0 - 1.0 / self.ratio, self.schedule)

    @override
    def _log(self, pl_module: pl.LightningModule) -> None:
        pl_module.log("compress/rank_ratio", self.ratio_reached(), on_step=True, on_epoch=False)

    @override
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
        if self.verbose:
            rank_zero_info(
                f"LowRankFactorization: step {step}, budget {self._keep:.4f} of dense, ranks {self._ranks}, "
                f"{self.ratio_reached():.2f}x fewer {self.budget}"
            )

    @override
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
    def selected_layers(self) -> list[str]:
        """Names of the layers this callback constrains (known after ``setup``)."""
        return list(self._weights)
