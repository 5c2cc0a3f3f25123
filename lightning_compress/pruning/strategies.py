"""What each kind of pruning does between the ramp's steps: one strategy per kind behind
:class:`~lightning_compress.MagnitudePruning`, which keeps only the ramp.

* :class:`WeightMasks` — unstructured and N:M: one keep-mask per weight, ranked by magnitude, fixed random scores, a
  threshold or gradient scores (:func:`~lightning_compress.core.masks.compute_masks`).
* :class:`ChannelGroupMasks` — Torch-Pruning's dependency groups (:mod:`lightning_compress.pruning.groups`): whole
  coupled channels zeroed together, ranked by their L2 magnitude or gradients.

A strategy is told the targets of an update and answers with the structure; it owns its scores and its checkpoint
state. Adding a criterion touches the strategy that ranks with it, nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_compress.core.configs import PruningConfig
from lightning_compress.core.masks import GRADIENT_CRITERIA, compute_masks, gradient_term, random_scores, sparsity
from lightning_compress.core.selection import LayerWeights, match_overrides
from lightning_compress.pruning.groups import (
    ChannelGroup,
    GradientPlan,
    channel_groups,
    channel_products,
    gradient_plan,
    group_index,
    group_keep,
    group_scores,
    record_groups,
    weight_masks,
)

#: The target of a layer (or group root) with its own final sparsity: final → the schedule's value for it now.
Targets = Callable[[float], float]


class PruningStrategy:
    """The masks of one kind of pruning over the selected ``weights`` (see the module's docstring)."""

    def __init__(self, config: PruningConfig, selected: Sequence[tuple[str, nn.Module]], weights: LayerWeights):
        self.config = config
        self.selected = list(selected)
        self.weights = weights
        self.masks: dict[str, Tensor] = {}  # layer name → bool keep-mask of its weight
        self.scored_steps = 0  # optimizer steps whose gradients the scores hold (gradient criteria)

    @property
    def gradient(self) -> bool:
        return self.config.criterion in GRADIENT_CRITERIA

    def build(self, example: Any, pl_module: nn.Module) -> None:
        """What must be traced on an input before the first update (nothing by default)."""

    def add_gradients(self) -> None:
        """Add this optimizer step's ``w·∂L/∂w`` terms to the scores (gradient criteria; a step with non-finite
        gradients, which the AMP scaler skips, is not counted)."""

    def update(self, trainer: pl.Trainer | None, target: float, scheduled: Targets) -> None:
        """New masks at ``target`` (a layer or group with its own final sparsity at ``scheduled(final)``); without a
        Trainer, once (:func:`~lightning_compress.prune_`)."""
        raise NotImplementedError

    def apply(self) -> None:
        """Write the masks into the weights (after an optimizer step moved them)."""
        for name, mask in self.masks.items():
            self.weights[name].mul_(mask)

    def measured(self) -> float:
        """The sparsity reached, in the unit of ``final_sparsity``."""
        return sparsity(self.weights)

    def state(self) -> dict[str, Any]:
        return {"masks": {name: mask.cpu() for name, mask in self.masks.items()}}

    def load(self, state: Mapping[str, Any]) -> None:
        masks = state.get("masks", {})
        if masks and set(masks) != set(self.weights):
            raise ValueError(
                f"The checkpoint's pruning masks are for layers {sorted(masks)}, but this MagnitudePruning "
                f"selects {sorted(self.weights)}. Use the include/exclude of the run that wrote it."
            )
        self.masks = {n: m.to(self.weights[n].device, torch.bool) for n, m in masks.items()}
        self.scored_steps = int(state.get("scored_steps", 0)) if self.gradient else 0

    def scores_used(self, scores: Sequence[Tensor]) -> None:
        """After an update: Taylor scores start again (they are sums between updates); movement keeps summing."""
        if self.config.criterion != "taylor" or self.scored_steps == 0:
            return
        for score in scores:
            score.zero_()
        self.scored_steps = 0

    @staticmethod
    def broadcast(trainer: pl.Trainer | None, value: Any) -> Any:
        """Rank zero's ``value`` on every rank: every rank holds the same weights under DDP, so the structures agree
        already; broadcasting makes that a guarantee rather than an assumption (ties broken differently). Without a
        Trainer (:func:`~lightning_compress.prune_`), ``value`` itself."""
        return trainer.strategy.broadcast(value, src=0) if trainer is not None and trainer.world_size > 1 else value


class WeightMasks(PruningStrategy):
    """Unstructured and N:M masks, one per weight."""

    def __init__(self, config: PruningConfig, selected: Sequence[tuple[str, nn.Module]], weights: LayerWeights):
        super().__init__(config, selected, weights)
        self.scores: dict[str, Tensor] | None = None
        if config.criterion == "random":
            generator = torch.Generator().manual_seed(config.seed)
            self.scores = {n: random_scores(w, generator) for n, w in weights.items()}
        if self.gradient:
            self.scores = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}

    def add_gradients(self) -> None:
        assert self.scores is not None
        terms = {
            n: gradient_term((w.detach() * grad).float(), self.config.criterion)
            for n, w in self.weights.items()
            if (grad := self.weights.grad(n)) is not None
        }
        if not math.isfinite(float(sum(t.sum() for t in terms.values()))):
            return
        for name, term in terms.items():
            self.scores[name] += term
        self.scored_steps += 1

    def update(self, trainer: pl.Trainer | None, target: float, scheduled: Targets) -> None:
        config = self.config
        overrides = config.per_layer
        own = {n: scheduled(v) for n in self.weights if (v := match_overrides(n, overrides, self.selected)) is not None}
        # before any optimizer step a gradient criterion has no scores yet: magnitude ranks
        scores = None if self.gradient and self.scored_steps == 0 else self.scores
        criterion = "magnitude" if self.gradient and scores is None else config.criterion
        masks = compute_masks(
            self.weights,
            target,
            granularity=config.parsed_granularity,
            scope=str(config.scope),
            criterion=criterion,
            layer_sparsity=own,
            previous=self.masks or None,
            scores=scores,
            threshold=config.threshold,
        )
        masks = self.broadcast(trainer, masks)
        self.masks = {n: m.to(self.weights[n].device) for n, m in masks.items()}
        self.scores_used(list((self.scores or {}).values()) if self.gradient else [])

    def state(self) -> dict[str, Any]:
        state = super().state()
        if self.gradient:
            state.update(scores={n: t.cpu() for n, t in (self.scores or {}).items()}, scored_steps=self.scored_steps)
        return state

    def load(self, state: Mapping[str, Any]) -> None:
        super().load(state)
        if self.gradient and "scores" in state:
            self.scores = {n: t.to(self.weights[n].device) for n, t in state["scores"].items()}


class ChannelGroupMasks(PruningStrategy):
    """Whole channel groups (Torch-Pruning's dependency graph), traced on one input before the first update;
    ``final_sparsity`` is the share of the groups' channels removed."""

    def __init__(self, config: PruningConfig, selected: Sequence[tuple[str, nn.Module]], weights: LayerWeights):
        super().__init__(config, selected, weights)
        self.groups: list[ChannelGroup] = []
        self.keep: list[Tensor] = []  # per group, a bool keep-mask over its channels
        self.index: list[tuple[Tensor, int, Tensor]] = []  # (parameter, dim, removed indices): what apply zeroes
        self.plan: GradientPlan = []  # gradient criteria: where the groups' channels sit in each parameter
        self.scores: list[Tensor] = []  # gradient criteria: per group, a score per channel

    def build(self, example: Any, pl_module: nn.Module) -> None:
        if self.groups:
            return  # traced already
        if not isinstance(example, Tensor):
            raise ValueError(
                "granularity='channel' traces the model on one input to find its channel groups: set "
                "`example_input_array` on your LightningModule (a tensor batch), or pass `example_input` to prune_."
            )
        self.groups = channel_groups(pl_module, example.to(next(pl_module.parameters()).device), self.config.include,
                                     self.config.exclude)  # fmt: skip
        if self.gradient:
            self.plan = gradient_plan(self.groups)
        if not self.groups:
            raise ValueError(
                "granularity='channel': no channel group to prune (the last layer keeps its outputs; groups coupled "
                "with excluded layers, normalization layers or embeddings stay). Check include/exclude, or use "
                "another granularity."
            )
        record_groups(self.groups)  # export_compact cuts these groups, and only these
        roots = {g.root for g in self.groups}
        for pattern in self.config.per_layer:
            if not any(match_overrides(r, {pattern: 0.0}, self.selected) is not None for r in roots):
                raise ValueError(
                    f"layer_sparsity pattern {pattern!r} matches no channel group's first layer "
                    f"({', '.join(sorted(roots))})."
                )

    def add_gradients(self) -> None:
        products = channel_products(self.plan, [g.channels for g in self.groups])
        if products is None:
            return  # a step the AMP scaler skips (non-finite gradients): it does not count
        terms = [gradient_term(p, self.config.criterion, channels=True) for p in products]
        if not self.scores:
            self.scores = [torch.zeros_like(t) for t in terms]
        for score, term in zip(self.scores, terms, strict=True):
            score += term
        self.scored_steps += 1

    def update(self, trainer: pl.Trainer | None, target: float, scheduled: Targets) -> None:
        config = self.config
        own = {
            i: scheduled(final)
            for i, g in enumerate(self.groups)
            if (final := match_overrides(g.root, config.per_layer, self.selected)) is not None
        }
        if self.gradient and self.scored_steps > 0:
            scores = [t.cpu() for t in self.scores]
        else:
            scores = group_scores(self.groups)
        keep = group_keep(self.groups, scores, target, str(config.scope), own, config.round_to)
        if trainer is not None and trainer.world_size > 1:
            keep = self.broadcast(trainer, [k.to(next(iter(self.weights.values())).device) for k in keep])
        self._set_keep([k.cpu() for k in keep])
        self.scores_used(self.scores)

    def _set_keep(self, keep: list[Tensor]) -> None:
        self.keep = keep
        self.index = group_index(self.groups, keep)
        self.masks = weight_masks(self.weights, self.index)

    def apply(self) -> None:
        for param, dim, indices in self.index:
            param.index_fill_(dim, indices, 0.0)

    def measured(self) -> float:
        """The share of the groups' channels removed."""
        total = sum(len(k) for k in self.keep)
        return sum(int((~k).sum()) for k in self.keep) / total if total else 0.0

    def state(self) -> dict[str, Any]:
        state = {**super().state(), "group_keep": [k.cpu() for k in self.keep]}
        if self.gradient:
            state.update(group_scores=[t.cpu() for t in self.scores], scored_steps=self.scored_steps)
        return state

    def load(self, state: Mapping[str, Any]) -> None:
        super().load(state)
        keep = state.get("group_keep") or []
        if keep:
            if [len(k) for k in keep] != [g.channels for g in self.groups]:
                raise ValueError(
                    "The checkpoint's channel groups do not match this model's "
                    f"({[len(k) for k in keep]} channels vs {[g.channels for g in self.groups]})."
                )
            self._set_keep([k.to(torch.bool) for k in keep])
        if self.gradient:
            device = next(iter(self.weights.values())).device
            self.scores = [t.to(device) for t in state.get("group_scores", [])]


def strategy_for(
    config: PruningConfig, selected: Sequence[tuple[str, nn.Module]], weights: LayerWeights
) -> PruningStrategy:
    """The strategy of ``config``'s granularity."""
    kind = ChannelGroupMasks if config.parsed_granularity.kind == "channel" else WeightMasks
    return kind(config, selected, weights)
