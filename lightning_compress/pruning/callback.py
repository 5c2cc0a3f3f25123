"""MagnitudePruning: gradual pruning as a Lightning callback.

The callback only adapts the pure functions of :mod:`~lightning_compress.core.schedules` and
:mod:`~lightning_compress.core.masks` to the Trainer: it picks the weights, asks the schedule for a
target at the current optimizer step, asks the masks for the zeros and writes them into the weights in
place. No forward hooks, no extra parameters: the model's ``state_dict`` keys stay those of the user's
class.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_compress.core.checks import (
    Schedule,
    check_choice,
    check_flag,
    check_number,
    parse_epoch,
    same_kind_order,
)
from lightning_compress.core.configs import CriterionName, PruningConfig, ScheduleName, ScopeName, check_sparsity
from lightning_compress.core.masks import (
    GRADIENT_CRITERIA,
    Granularity,
    check_nm_shapes,
    compute_masks,
    gradient_term,
    random_scores,
)
from lightning_compress.core.schedules import sparsity_at
from lightning_compress.core.selection import (
    check_overrides_match,
    distinct_weights,
    match_overrides,
    not_compressed,
    select_modules,
    weights_of,
)
from lightning_compress.pruning.groups import (
    ChannelGroup,
    GradientPlan,
    channel_groups,
    channel_products,
    gradient_plan,
    group_index,
    group_keep,
    group_scores,
    require_torch_pruning,
    weight_masks,
)
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


class MagnitudePruning(StepwiseTechnique):
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
        round_to: With ``granularity="channel"`` and ``scope="layer"``: each group keeps a multiple of this many
            channels (8 suits ONNX Runtime's CPU convolution kernels; see ``benchmarks/channel_groups.py``).

    Example::

        import lightning.pytorch as pl
        from lightning_compress import MagnitudePruning

        trainer = pl.Trainer(max_epochs=10, callbacks=[MagnitudePruning(final_sparsity=0.9, end_epoch=8)])
        trainer.fit(model, datamodule)   # model's Conv/Linear weights are now 90 % zeros
    """

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
        round_to: int | None = None,
    ) -> None:
        super().__init__()
        #: What is pruned (checked there, as prune_ checks it); the callback adds only *when* (the ramp).
        self.config = PruningConfig(
            final_sparsity=final_sparsity, granularity=granularity, scope=scope, criterion=criterion,
            threshold=threshold, layer_sparsity=layer_sparsity, include=include, exclude=exclude, seed=seed,
            round_to=round_to,
        )  # fmt: skip
        config = self.config
        self.granularity: Granularity = config.parsed_granularity
        self.final_sparsity, self.scope, self.criterion = config.final_sparsity, config.scope, config.criterion
        self.threshold, self.seed, self.round_to = config.threshold, config.seed, config.round_to
        self.layer_sparsity: dict[str, float] = dict(cast(Mapping[str, float], config.layer_sparsity))
        self.initial_sparsity = check_sparsity("initial_sparsity", initial_sparsity, self.granularity)
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"`initial_sparsity` ({initial_sparsity}) must not exceed `final_sparsity` ({final_sparsity})."
            )
        self.start_epoch = parse_epoch("start_epoch", start_epoch)
        self.end_epoch = parse_epoch("end_epoch", end_epoch)
        same_kind_order(("start_epoch", self.start_epoch), ("end_epoch", self.end_epoch))
        self.schedule = check_choice("schedule", schedule, Schedule).value
        self.include, self.exclude = include, exclude
        self.update_every_n_steps = check_number("update_every_n_steps", update_every_n_steps, 1, integer=True,
                                                 optional=True)  # fmt: skip
        self.verbose = check_flag("verbose", verbose)
        self._epochs: dict[str, float | None] = {}  # start/end in epochs, once the Trainer's length is known

        self._bound: Any = None  # a weak reference to the module this callback prunes
        self._reset()

    def _reset(self) -> None:
        """Forget every model-specific state (a new model is being pruned)."""
        self._weights: dict[str, Tensor] = {}
        self._selected: list[tuple[str, nn.Module]] = []
        self._masks: dict[str, Tensor] = {}
        self._scores: dict[str, Tensor] | None = None
        self._plan: GradientPlan = []  # channel groups with a gradient criterion: where their channels sit
        self._group_grad_scores: list[Tensor] = []
        self._scored_steps = 0  # optimizer steps whose gradients the scores hold
        self._loaded: dict[str, Any] | None = None
        self._last_update_step = -1
        self._last_seen_step = -1
        self._target = 0.0
        self._sparsity = 0.0
        self._start_step = self._end_step = self._every = 0
        self._groups: list[ChannelGroup] = []  # granularity="channel": the dependency groups, built on the first batch
        self._group_keep: list[Tensor] = []
        self._group_index: list[tuple[Tensor, int, Tensor]] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(granularity=str(self.granularity), include=self.include, exclude=self.exclude)

    # ------------------------------------------------------------------ policy (overridable)
    def filter_modules(self, pl_module: pl.LightningModule) -> list[tuple[str, nn.Module]]:
        """The ``(name, module)`` pairs whose ``weight`` is pruned. Override for other selections."""
        return select_modules(pl_module, self.include, self.exclude)

    def should_update(self, step: int) -> bool:
        """Whether the masks are recomputed after optimizer step ``step``."""
        return update_due(step, self._start_step, self._end_step, self._every, self._last_update_step)

    def scheduled_sparsity(self, step: int, final: float | None = None) -> float:
        """The sparsity the schedule asks for after optimizer step ``step`` (for a layer override, its own
        ``final``)."""
        final = self.final_sparsity if final is None else final
        progress = ramp_progress(step, self._start_step, self._end_step)
        return sparsity_at(progress, min(self.initial_sparsity, final), final, self.schedule)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._new_model(trainer, pl_module, stage):
            return
        selected = self.filter_modules(pl_module)
        if (message := not_compressed(pl_module, "MagnitudePruning")) is not None:
            rank_zero_warn(message)
        frozen = [n for n, m in selected if isinstance(w := getattr(m, "weight", None), Tensor) and not w.requires_grad]
        if frozen and self.criterion in GRADIENT_CRITERIA:
            raise ValueError(
                f"MagnitudePruning(criterion={self.criterion!r}) scores weights by their gradients, but the selected "
                f"layer(s) {', '.join(repr(n) for n in frozen)} are frozen (weight.requires_grad=False) and get none. "
                "Leave them out with `exclude`, or unfreeze them."
            )
        if frozen:
            rank_zero_warn(
                f"MagnitudePruning leaves {len(frozen)} frozen layer(s) (weight.requires_grad=False) dense: "
                f"{', '.join(repr(n) for n in frozen)}. Unfreeze them to prune them."
            )
            selected = [(n, m) for n, m in selected if n not in frozen]
            if not selected:
                raise ValueError("MagnitudePruning: every selected layer is frozen (requires_grad=False).")
        selected = distinct_weights(selected)
        weights = weights_of(selected)
        check_overrides_match(selected, self.layer_sparsity, "layer_sparsity")
        if self.granularity.kind == "channel":
            require_torch_pruning()  # refused at setup, not at the first batch
        check_nm_shapes(weights, self.granularity)
        goal = f"final_sparsity={self.final_sparsity:g}"
        start, end = resolve_ramp(trainer, "MagnitudePruning", self.start_epoch, self.end_epoch, goal)
        self._epochs = {"start": start, "end": end}
        self._bound = weakref.ref(pl_module)
        warn_if_spawned(trainer, "MagnitudePruning", "masks")
        self._selected = selected
        self._weights = weights
        if self.criterion == "random":
            generator = torch.Generator().manual_seed(self.seed)
            self._scores = {n: random_scores(w, generator) for n, w in weights.items()}
        if self.criterion in GRADIENT_CRITERIA and self.granularity.kind != "channel":
            self._scores = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_optimizers(trainer, pl_module, "MagnitudePruning")
        start, end = self._epochs["start"], self._epochs["end"]
        assert start is not None and end is not None
        goal = f"final_sparsity={self.final_sparsity:g}"
        self._start_step, self._end_step = ramp_steps(trainer, "MagnitudePruning", start, end, goal)
        self._every = update_every(self._start_step, self._end_step, self.update_every_n_steps)
        if self.granularity.kind == "channel" and not self._groups:
            self._build_groups(trainer, pl_module)
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
        self._last_seen_step = trainer.global_step
        self._step(trainer, pl_module, trainer.global_step, log=False)

    @override
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # The gradients here are accumulated over the step's batches, all-reduced under DDP and unscaled under AMP.
        if self.criterion not in GRADIENT_CRITERIA or not self._weights or self.target_reached:
            return
        if self._groups:
            products = channel_products(self._plan, [g.channels for g in self._groups])
            if products is None:
                return  # a step the AMP scaler skips (non-finite gradients): it does not count
            terms = [gradient_term(p, self.criterion, channels=True) for p in products]
            if not self._group_grad_scores:
                self._group_grad_scores = [torch.zeros_like(t) for t in terms]
            for score, term in zip(self._group_grad_scores, terms, strict=True):
                score += term
        else:
            assert self._scores is not None
            step_terms = {
                n: gradient_term((w.detach() * w.grad).float(), self.criterion)
                for n, w in self._weights.items()
                if w.grad is not None
            }
            if not math.isfinite(float(sum(t.sum() for t in step_terms.values()))):
                return
            for name, term in step_terms.items():
                self._scores[name] += term
        self._scored_steps += 1

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        per_layer = self.layer_sparsities()
        pl_module.log_dict({f"compress/sparsity/{n}": v for n, v in per_layer.items()}, on_epoch=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        rows = []
        for name, module in self._selected:
            weight = self._weights[name]
            nonzero = int(torch.count_nonzero(weight))
            rows.append([name, type(module).__name__, weight.numel(), nonzero, 1.0 - nonzero / weight.numel(),
                         weight.numel() * weight.element_size()])  # fmt: skip
        columns = ["layer", "type", "params", "nonzero", "sparsity", "bytes"]
        log_table(trainer.loggers, "compress/layers", columns, rows, trainer.default_root_dir)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {name: mask.cpu() for name, mask in self._masks.items()},
            "group_keep": [keep.cpu() for keep in self._group_keep],
            "last_update_step": self._last_update_step,
            "target": self._target,
            "end_step": self._end_step,
            **self._gradient_state(),
        }

    def restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: str | os.PathLike) -> None:
        """Rebuild this callback's masks on ``pl_module`` from a checkpoint a run with it wrote — in a process that did
        not train: the user's process after ``strategy="ddp_spawn"`` (Lightning copies only the weights back to it),
        or a notebook reading a cluster job's checkpoint. The model's weights are left as they are.

        Raises:
            ValueError: The checkpoint holds no state of this callback (another ``state_key``).
        """
        state = callback_state(checkpoint, self.state_key, "MagnitudePruning")
        self._bound = None
        self.setup(trainer, pl_module, "fit")
        if self.granularity.kind == "channel":
            self._build_groups(trainer, pl_module)
        self._restore(state)
        self._end_step = int(state.get("end_step", self._last_update_step))

    # ------------------------------------------------------------------ internals
    def _gradient_state(self) -> dict[str, Any]:
        if self.criterion not in GRADIENT_CRITERIA:
            return {}
        return {
            "scores": {n: t.cpu() for n, t in (self._scores or {}).items()},
            "group_scores": [t.cpu() for t in self._group_grad_scores],
            "scored_steps": self._scored_steps,
        }

    def _restore_gradient_state(self, state: dict[str, Any]) -> None:
        if self.criterion not in GRADIENT_CRITERIA or "scored_steps" not in state:
            return
        if self._scores is not None:
            self._scores = {n: t.to(self._weights[n].device) for n, t in state["scores"].items()}
        device = next(iter(self._weights.values())).device
        self._group_grad_scores = [t.to(device) for t in state.get("group_scores", [])]
        self._scored_steps = int(state["scored_steps"])

    def _ranking_scores(self) -> dict[str, Tensor] | None:
        """The scores of this update (``None``: ranked by magnitude, as before any optimizer step with a gradient
        criterion)."""
        if self.criterion in GRADIENT_CRITERIA and self._scored_steps == 0:
            return None
        return self._scores

    def _scores_used(self) -> None:
        """After a mask update: Taylor scores start again (they are sums between updates); movement keeps summing."""
        if self.criterion != "taylor" or self._scored_steps == 0:
            return
        for score in [*(self._scores or {}).values(), *self._group_grad_scores]:
            score.zero_()
        self._scored_steps = 0

    def _restore(self, state: dict[str, Any]) -> None:
        masks = state.get("masks", {})
        if masks and set(masks) != set(self._weights):
            raise ValueError(
                f"The checkpoint's pruning masks are for layers {sorted(masks)}, but this MagnitudePruning "
                f"selects {sorted(self._weights)}. Use the include/exclude of the run that wrote it."
            )
        self._masks = {n: m.to(self._weights[n].device, torch.bool) for n, m in masks.items()}
        keep = state.get("group_keep") or []
        if self._groups and keep:
            if [len(k) for k in keep] != [g.channels for g in self._groups]:
                raise ValueError(
                    "The checkpoint's channel groups do not match this model's "
                    f"({[len(k) for k in keep]} channels vs {[g.channels for g in self._groups]})."
                )
            self._group_keep = [k.to(torch.bool) for k in keep]
            self._group_index = group_index(self._groups, self._group_keep)
        self._last_update_step = int(state.get("last_update_step", -1))
        self._target = float(state.get("target", 0.0))
        self._restore_gradient_state(state)
        self._apply()
        self._sparsity = self.channel_sparsity() if self._groups else self.sparsity()

    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, log: bool = True) -> None:
        updated = self.should_update(step)
        if updated:
            self._update(trainer, step)
        elif self._masks:
            self._apply()
        # self.log costs about a millisecond per key: log on the Trainer's own logging steps (the only ones its loggers
        # write) and whenever the masks change, so that callback_metrics always hold the current values.
        logging_step = step % max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1)) == 0
        if self._masks and log and (updated or logging_step):
            pl_module.log("compress/sparsity", self._sparsity, on_step=True, on_epoch=False)
            pl_module.log("compress/target_sparsity", self._target, on_step=True, on_epoch=False)

    @torch.no_grad()
    def _update(self, trainer: pl.Trainer, step: int) -> None:
        if self._groups:
            self._update_groups(trainer, step)
            return
        weights = self._weights
        own = {n: v for n in weights if (v := match_overrides(n, self.layer_sparsity, self._selected)) is not None}
        self._target = self.scheduled_sparsity(step)
        scores = self._ranking_scores()
        criterion = "magnitude" if self.criterion in GRADIENT_CRITERIA and scores is None else self.criterion
        try:
            masks = compute_masks(
                weights,
                self._target,
                granularity=self.granularity,
                scope=str(self.scope),
                criterion=criterion,
                layer_sparsity={n: self.scheduled_sparsity(step, final) for n, final in own.items()},
                previous=self._masks or None,
                scores=scores,
                threshold=self.threshold,
            )
        except ValueError as err:
            raise RuntimeError(f"MagnitudePruning stopped training at optimizer step {step}: {err}") from err
        if trainer.world_size > 1:
            # Every rank holds the same weights under DDP, so the masks agree already; broadcasting rank
            # zero's makes that a guarantee rather than an assumption (e.g. ties broken differently).
            masks = trainer.strategy.broadcast(masks, src=0)
            masks = {n: m.to(weights[n].device) for n, m in masks.items()}
        self._masks = masks
        self._last_update_step = step
        self._scores_used()
        self._apply()
        self._sparsity = self.sparsity()
        if self.criterion == "threshold":
            self._target = self._sparsity
        if self.verbose:
            rank_zero_info(f"MagnitudePruning: step {step}, target {self._target:.4f}, measured {self._sparsity:.4f}")

    @torch.no_grad()
    def _update_groups(self, trainer: pl.Trainer, step: int) -> None:
        """granularity="channel": the schedule's share of all channels removed by dependency group (each group's
        coupled parameters zeroed together), ranked by group L2 magnitude, globally or per group."""
        self._target = self.scheduled_sparsity(step)
        own = {
            i: self.scheduled_sparsity(step, final)
            for i, g in enumerate(self._groups)
            if (final := match_overrides(g.root, self.layer_sparsity, self._selected)) is not None
        }
        if self.criterion in GRADIENT_CRITERIA and self._scored_steps > 0:
            scores = [t.cpu() for t in self._group_grad_scores]
        else:
            scores = group_scores(self._groups)
        keep = group_keep(self._groups, scores, self._target, str(self.scope), own, self.round_to)
        if trainer.world_size > 1:
            keep = [k.to(next(iter(self._weights.values())).device) for k in keep]
            keep = trainer.strategy.broadcast(keep, src=0)
        self._group_keep = [k.cpu() for k in keep]
        self._group_index = group_index(self._groups, self._group_keep)
        self._masks = weight_masks(self._weights, self._group_index)
        self._last_update_step = step
        self._scores_used()
        self._apply()
        self._sparsity = self.channel_sparsity()
        if self.verbose:
            rank_zero_info(
                f"MagnitudePruning: step {step}, target {self._target:.4f} of the channels, "
                f"measured {self._sparsity:.4f}"
            )

    def _build_groups(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The channel groups of the selected layers, traced on one input batch (``example_input_array`` when the
        module has one, else the first training batch, read without touching the training's random streams)."""
        example = first_input(trainer, pl_module)
        if not isinstance(example, Tensor):
            raise ValueError(
                "MagnitudePruning(granularity='channel') traces the model on one input to find its channel groups: "
                "set `example_input_array` on your LightningModule (a tensor batch)."
            )
        self._groups = channel_groups(pl_module, example.to(pl_module.device), self.include, self.exclude)
        if self.criterion in GRADIENT_CRITERIA:
            self._plan = gradient_plan(self._groups)
        if not self._groups:
            raise ValueError(
                "MagnitudePruning(granularity='channel'): no channel group can be pruned (the last layer keeps its "
                "outputs; groups coupled with excluded layers stay). Check include/exclude."
            )
        roots = {g.root for g in self._groups}
        for pattern in self.layer_sparsity:
            if not any(match_overrides(r, {pattern: 0.0}, self._selected) is not None for r in roots):
                raise ValueError(
                    f"layer_sparsity pattern {pattern!r} matches no channel group's first layer "
                    f"({', '.join(sorted(roots))})."
                )

    @torch.no_grad()
    def _apply(self) -> None:
        if self._groups:
            for param, dim, indices in self._group_index:
                param.index_fill_(dim, indices, 0.0)
            return
        for name, mask in self._masks.items():
            self._weights[name].mul_(mask)

    # ------------------------------------------------------------------ read-outs
    @property
    def masks(self) -> dict[str, Tensor]:
        """The current masks, layer name → bool tensor (``True`` keeps the weight)."""
        return dict(self._masks)

    def layer_sparsities(self) -> dict[str, float]:
        """Measured fraction of zero weights in each selected layer."""
        return {n: 1.0 - int(torch.count_nonzero(w)) / w.numel() for n, w in self._weights.items()}

    def sparsity(self) -> float:
        """Measured fraction of zero weights over all selected layers together."""
        total = sum(w.numel() for w in self._weights.values())
        zeros = sum(w.numel() - int(torch.count_nonzero(w)) for w in self._weights.values())
        return zeros / total if total else 0.0

    def channel_sparsity(self) -> float:
        """granularity="channel": the fraction of the groups' channels removed (what ``final_sparsity`` means there)."""
        total = sum(len(k) for k in self._group_keep)
        return sum(int((~k).sum()) for k in self._group_keep) / total if total else 0.0

    @property
    def groups(self) -> list[ChannelGroup]:
        """granularity="channel": the dependency groups (known after the first batch), each naming its layers."""
        return list(self._groups)

    @property
    def weights(self) -> dict[str, Tensor]:
        """The pruned weight tensors, layer name → parameter (known after ``setup``)."""
        return dict(self._weights)

    @property
    def target_reached(self) -> bool:
        """Whether the ramp has ended: the masks are at their final sparsity (see :class:`CompressionTarget`)."""
        return bool(self._masks) and self._last_update_step >= self._end_step

    @property
    def structure_final_epoch(self) -> float | None:
        """The epoch at which the ramp ends and the masks stop changing (known after ``setup``); see
        :class:`~lightning_compress.core.protocol.ChangesStructure`."""
        return self._epochs.get("end")

    @property
    def selected_layers(self) -> list[str]:
        """Names of the layers this callback prunes (known after ``setup``)."""
        return list(self._weights)
