"""MagnitudePruning: gradual pruning as a Lightning callback.

The callback keeps the ramp (:class:`~lightning_compress.trainer.technique.RampedTechnique`): the schedule's target at
the current optimizer step. What is pruned is a :class:`~lightning_compress.PruningConfig` (checked there, as
:func:`~lightning_compress.prune_` checks it) and how — single weights and N:M patterns, or whole channel groups — is a
strategy of :mod:`lightning_compress.pruning.strategies`. No forward hooks, no extra parameters: the model's
``state_dict`` keys stay those of the user's class.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_compress.core import masks
from lightning_compress.core.configs import CriterionName, PruningConfig, ScheduleName, ScopeName, check_sparsity
from lightning_compress.core.masks import Granularity, check_nm_shapes
from lightning_compress.core.schedules import sparsity_at
from lightning_compress.core.selection import check_overrides_match, weights_of
from lightning_compress.pruning.groups import ChannelGroup, require_torch_pruning
from lightning_compress.pruning.strategies import ChannelGroupMasks, PruningStrategy, strategy_for
from lightning_compress.trainer.progress import first_input
from lightning_compress.trainer.tables import log_table
from lightning_compress.trainer.technique import RampedTechnique


class MagnitudePruning(RampedTechnique):
    r"""Gradual magnitude pruning (Zhu & Gupta, 2017) of a LightningModule's Conv and Linear weights.

    Sparsity ramps from ``initial_sparsity`` at ``start_epoch`` to ``final_sparsity`` at ``end_epoch``
    along a cubic (default) or linear schedule, then holds. Progress counts optimizer steps, so gradient
    accumulation does not distort it, and epochs may be fractional. The masks are recomputed every
    ``update_every_n_steps`` optimizer steps during the ramp and at its end; after every optimizer step the
    pruned weights are written back to exactly zero, so momentum or weight decay cannot revive them.

    Args:
        final_sparsity: Fraction of the selected weights that are zero at the end, in [0, 1).
        initial_sparsity: Sparsity at ``start_epoch``, in [0, ``final_sparsity``].
        start_epoch: Epoch (fractional allowed) at which pruning starts, or a share of training such as ``"20%"``
            (of the Trainer's ``max_epochs``: a recipe written that way follows any Trainer's length).
        end_epoch: Epoch (or share of training) at which ``final_sparsity`` is reached. Must not exceed the
            Trainer's ``max_epochs`` (an error, raised before the first step: the ramp would never finish).
        schedule: ``"cubic"`` or ``"linear"``.
        granularity: ``"unstructured"`` (single weights), ``"channel"`` (whole channel groups: a layer's output
            channel with its bias, the following BatchNorm's scale and shift, the next layers' input channel and
            every channel coupled through residual additions or concatenations, found by Torch-Pruning's dependency
            graph on the first training batch or ``example_input_array``; ranked by their L2 norm; ``final_sparsity``
            is the share of channels removed, :meth:`channel_sparsity`; a group always keeps one channel; then
            :func:`~lightning_compress.export_compact` cuts them out) or ``"N:M"`` such as ``"2:4"`` (in every group
            of M consecutive input weights the N smallest are zero; ``final_sparsity`` may then be at most N/M,
            reached when every group follows the pattern).
        scope: ``"global"`` (one ranking across all selected layers or channel groups; the default for
            unstructured) or ``"layer"`` (every layer or group at the target; the default for channel and N:M).
        criterion: ``"magnitude"`` (default), ``"random"`` (fixed random scores from ``seed``),
            ``"threshold"`` (every ``|w| < threshold`` is pruned at each update; the schedule's target is
            then not used and the measured sparsity is what the threshold gives), or a gradient criterion, whose
            scores add up ``w·∂L/∂w`` before every optimizer step (the gradients it applies: accumulated over
            ``accumulate_grad_batches``, unscaled under AMP):
            ``"taylor"`` (first-order Taylor, Molchanov et al. 2019: ``|w·g|`` summed between mask updates; for a
            channel group the square of its summed ``w·g``) or ``"movement"`` (Sanh et al. 2020: ``−w·g`` summed
            over all of training, which favours weights that training moves away from zero — meant for fine-tuning
            a trained model). Both work with every granularity (movement on channel groups with ``scope="layer"``); a
            mask update before any optimizer step (an ``initial_sparsity`` at step 0) ranks by magnitude. The scores
            are in the checkpoint.
        threshold: The magnitude threshold for ``criterion="threshold"``.
        layer_sparsity: ``{pattern: final sparsity}`` overrides (regular expressions or selectors such as
            ``"@first"``, ``"@last"``, ``"@Linear"``: see :mod:`lightning_compress.core.selection`); a matching
            layer is ranked on its own and ramps to its own value along the same schedule. Every pattern must
            match a selected layer. A path reads that mapping from a YAML file, e.g. the ``layer_sparsity.yaml``
            of a sensitivity scan (``lightning-compress-sensitivity``).
        include: Regular expression(s) searched in ``pl_module.named_modules()`` names; only matching
            Conv/Linear modules are pruned. Each must match at least one.
        exclude: Regular expression(s) for modules to leave dense.
        update_every_n_steps: Optimizer steps between mask updates during the ramp. ``None`` spreads
            50 updates evenly over it, at most one every 4 steps (a short ramp then gets fewer; the last update is
            always at the ramp's end).
        seed: Seed of the random scores for ``criterion="random"``.
        verbose: Print a line at every mask update (rank zero only).
            A frozen layer (``weight.requires_grad=False``) is left dense, named in one warning.
        finish_on_stop: When training stops before ``final_sparsity`` is reached (EarlyStopping, ``max_time``,
            ``max_steps``), apply the final masks at the end of fit (default); ``False`` leaves the model where it
            stopped. Either way a warning says what was reached against what was asked.
        round_to: With ``granularity="channel"`` and ``scope="layer"``: each group keeps a multiple of this many
            channels (8 suits ONNX Runtime's CPU convolution kernels; see ``benchmarks/channel_groups.py``).

    Example::

        import lightning.pytorch as pl
        from lightning_compress import MagnitudePruning

        trainer = pl.Trainer(max_epochs=10, callbacks=[MagnitudePruning(final_sparsity=0.9, end_epoch=8)])
        trainer.fit(model, datamodule)   # model's Conv/Linear weights are now 90 % zeros
    """

    holds = "masks"

    def __init__(
        self,
        final_sparsity: float = 0.9,
        initial_sparsity: float = 0.0,
        start_epoch: float | str = 0.0,
        end_epoch: float | str = 10.0,
        schedule: ScheduleName = "cubic",
        granularity: str = "unstructured",
        scope: ScopeName | None = None,
        criterion: CriterionName = "magnitude",
        threshold: float | None = None,
        layer_sparsity: dict[str, float] | str | os.PathLike | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        update_every_n_steps: int | None = None,
        seed: int = 0,
        verbose: bool = False,
        finish_on_stop: bool = True,
        round_to: int | None = None,
    ) -> None:
        config = PruningConfig(
            final_sparsity=final_sparsity, granularity=granularity, scope=scope, criterion=criterion,
            threshold=threshold, layer_sparsity=layer_sparsity, include=include, exclude=exclude, seed=seed,
            round_to=round_to,
        )  # fmt: skip
        super().__init__(config, start_epoch, end_epoch, schedule, update_every_n_steps, verbose, finish_on_stop)
        self.config: PruningConfig = config
        self.granularity: Granularity = config.parsed_granularity
        self.final_sparsity, self.scope, self.criterion = config.final_sparsity, config.scope, config.criterion
        self.threshold, self.seed, self.round_to = config.threshold, config.seed, config.round_to
        self.initial_sparsity = check_sparsity("initial_sparsity", initial_sparsity, self.granularity)
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"`initial_sparsity` ({initial_sparsity}) must not exceed `final_sparsity` ({final_sparsity})."
            )

    @override
    def _reset(self) -> None:
        super()._reset()
        self._strategy: PruningStrategy | None = None  # known after setup
        self._target = 0.0
        self._sparsity = 0.0

    @override
    def _identity(self) -> dict[str, Any]:
        return {"granularity": str(self.granularity)}

    @override
    def _goal(self) -> str:
        return f"final_sparsity={self.final_sparsity:g}"

    @override
    def _reached(self) -> str:
        unit = " of the channels" if self.granularity.kind == "channel" else ""
        return f"sparsity {self.strategy.measured():.3f}{unit}"

    # ------------------------------------------------------------------ policy (overridable)
    def scheduled_sparsity(self, step: int, final: float | None = None) -> float:
        """The sparsity the schedule asks for after optimizer step ``step`` (for a layer override, its own
        ``final``)."""
        final = self.final_sparsity if final is None else final
        return sparsity_at(self.ramp_progress(step), min(self.initial_sparsity, final), final, self.schedule)

    # ------------------------------------------------------------------ the ramp's steps
    @override
    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        selected = self.select(pl_module)
        weights = weights_of(selected)
        check_overrides_match(selected, self.config.per_layer, "layer_sparsity")
        if self.granularity.kind == "channel":
            require_torch_pruning()  # refused at setup, not at the first batch
        check_nm_shapes(weights, self.granularity)
        self._strategy = strategy_for(self.config, selected, weights)

    @property
    def strategy(self) -> PruningStrategy:
        """The masks of this callback's granularity (known after ``setup``)."""
        if self._strategy is None:
            raise RuntimeError("MagnitudePruning has selected no layers yet: it does so in setup (trainer.fit).")
        return self._strategy

    @override
    def _trace(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self.strategy, ChannelGroupMasks):
            self.strategy.build(first_input(trainer, pl_module), pl_module)  # once: the groups are kept

    @override
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # unlike the base, a step after the checkpoint's masks: the ramp's update at this step is recomputed as in an
        # uninterrupted run (the resume tests compare with one)
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
        self._step(trainer, pl_module, trainer.global_step, log=False)

    @override
    @torch.no_grad()
    def _update(self, trainer: pl.Trainer, step: int) -> None:
        self._target = self.scheduled_sparsity(step)
        try:
            self.strategy.update(trainer, self._target, lambda final: self.scheduled_sparsity(step, final))
        except ValueError as err:
            raise RuntimeError(f"MagnitudePruning stopped training at optimizer step {step}: {err}") from err
        self.strategy.apply()
        self._sparsity = self.strategy.measured()
        if self.criterion == "threshold":
            self._target = self._sparsity  # the threshold decides: the target is what it gives
        if self.verbose:
            unit = " of the channels" if self.granularity.kind == "channel" else ""
            rank_zero_info(
                f"MagnitudePruning: step {step}, target {self._target:.4f}{unit}, measured {self._sparsity:.4f}"
            )

    @override
    @torch.no_grad()
    def _apply(self) -> None:
        if self._strategy is not None:
            self._strategy.apply()

    @override
    def _log(self, pl_module: pl.LightningModule) -> None:
        pl_module.log("compress/sparsity", self._sparsity, on_step=True, on_epoch=False)
        pl_module.log("compress/target_sparsity", self._target, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ hooks
    @override
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # The gradients here are accumulated over the step's batches, all-reduced under DDP and unscaled under AMP.
        if self._strategy is not None and self._strategy.gradient and not self.target_reached:
            self._strategy.add_gradients()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        per_layer = self.layer_sparsities()
        pl_module.log_dict({f"compress/layer_sparsity/{n}": v for n, v in per_layer.items()}, on_epoch=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not trainer.is_global_zero or self._strategy is None:
            return
        rows = []
        for name, module in self._strategy.selected:
            weight = self._strategy.weights[name]
            nonzero = int(torch.count_nonzero(weight))
            rows.append([name, type(module).__name__, weight.numel(), nonzero, 1.0 - nonzero / weight.numel(),
                         weight.numel() * weight.element_size()])  # fmt: skip
        columns = ["layer", "type", "params", "nonzero", "sparsity", "bytes"]
        log_table(trainer.loggers, "compress/layers", columns, rows, trainer.default_root_dir)

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        state = self._strategy.state() if self._strategy is not None else {"masks": {}}
        return {**state, "last_update_step": self._last_update_step, "target": self._target,
                "end_step": self._end_step}  # fmt: skip

    @override
    def _restore(self, state: dict[str, Any]) -> None:
        self.strategy.load(state)
        self._last_update_step = int(state.get("last_update_step", -1))
        self._target = float(state.get("target", 0.0))
        self._apply()
        self._sparsity = self.strategy.measured()

    # ------------------------------------------------------------------ read-outs
    @property
    def masks(self) -> dict[str, Tensor]:
        """The current masks, layer name → bool tensor (``True`` keeps the weight)."""
        return dict(self._strategy.masks) if self._strategy is not None else {}

    def layer_sparsities(self) -> dict[str, float]:
        """Measured fraction of zero weights in each selected layer."""
        return {n: masks.sparsity(w) for n, w in self.weights.items()}

    def sparsity(self) -> float:
        """Measured fraction of zero weights over all selected layers together."""
        return masks.sparsity(self.weights)

    def channel_sparsity(self) -> float:
        """granularity="channel": the fraction of the groups' channels removed (what ``final_sparsity`` means there)."""
        return self.strategy.measured() if isinstance(self._strategy, ChannelGroupMasks) else 0.0

    @property
    def groups(self) -> list[ChannelGroup]:
        """granularity="channel": the dependency groups (known after the first batch), each naming its layers."""
        return list(self._strategy.groups) if isinstance(self._strategy, ChannelGroupMasks) else []

    @property
    def group_keep(self) -> list[Tensor]:
        """granularity="channel": per group, the bool keep-mask over its channels (``groups`` order)."""
        return list(self._strategy.keep) if isinstance(self._strategy, ChannelGroupMasks) else []

    @property
    def weights(self) -> dict[str, Tensor]:
        """The pruned weight tensors, layer name → parameter (known after ``setup``)."""
        return dict(self._strategy.weights) if self._strategy is not None else {}

    @property
    @override
    def target_reached(self) -> bool:
        """Whether the ramp has ended: the masks are at their final sparsity (see :class:`CompressionTarget`)."""
        return bool(self.masks) and super().target_reached

    @property
    def selected_layers(self) -> list[str]:
        """Names of the layers this callback prunes (known after ``setup``)."""
        return list(self.weights)
