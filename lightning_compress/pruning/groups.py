"""Channel groups: the channels that must go together for removing them to be exact — and the compact export.

Removing output channel ``c`` of a convolution is exact only if everything that carries that channel goes with it:
the convolution's bias, the BatchNorm scale and shift of ``c`` (a zeroed filter followed by a BatchNorm still feeds
the constant ``shift − mean·scale/std`` into the next layer), the next layers' input channel ``c``, and every
channel tied to ``c`` through residual additions, concatenations and depthwise or grouped convolutions. Torch-Pruning's
dependency graph (``torch-pruning``, traced on an example input) finds these groups; this module only reads them.

Trainer-free, in the user's shapes: :func:`channel_groups` lists the groups; :func:`group_scores` scores each
channel by the L2 magnitude of all its coupled parameters; :func:`group_keep` chooses the channels to keep (one
global ranking or per group, never a whole group); :func:`apply_group_masks_` zeroes the removed channels'
parameters in place (shapes unchanged). :func:`~lightning_compress.export.compact.export_compact` then builds the
physically smaller network (the zeroed channels cut out through the same dependency graph) and proves on an example
input that it computes what the masked model computes.

Example:
    >>> import torch
    >>> from lightning_compress.tasks import ResNet20
    >>> model = ResNet20((3, 32, 32), 10, width=8).eval()
    >>> x = torch.randn(4, 3, 32, 32)
    >>> groups = channel_groups(model, x)
    >>> keep = group_keep(groups, group_scores(groups), 0.5)
    >>> apply_group_masks_(groups, keep)
    >>> from lightning_compress.export.compact import export_compact
    >>> compact = export_compact(model, x)
    >>> sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in model.parameters())
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.checks import check_number
from lightning_compress.core.compiled import accepts_compiled
from lightning_compress.core.selection import select_modules

#: Layers whose per-channel parameters a group may hold; any other module with parameters in a group is refused.
SUPPORTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)


@dataclass
class Member:
    """One module's share of a group: its name, whether the group's channels are its outputs or inputs, and for
    each of the group's channels the indices along that dimension (several for a Linear after a flatten)."""

    name: str
    module: nn.Module
    side: str  # "out" or "in"
    indices: list[list[int]]


@dataclass
class ChannelGroup:
    """The channels of ``root`` (a Conv/Linear) and every parameter slice coupled to them."""

    root: str
    channels: int
    members: list[Member] = field(default_factory=list)

    def outputs(self) -> list[Member]:
        return [m for m in self.members if m.side == "out"]


def require_torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError:
        raise ImportError(
            "Channel groups need Torch-Pruning's dependency graph: `pip install 'lightning-compress[structured]'`."
        ) from None
    return torch_pruning


def channel_groups(
    model: nn.Module,
    example_input: Tensor,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> list[ChannelGroup]:
    """The prunable channel groups of ``model``, traced on ``example_input``.

    A group is rooted at a selected Conv/Linear (``include`` / ``exclude``: regexes or ``@first``/``@last``/
    ``@<Class>`` selectors, as for MagnitudePruning); the model's last layer keeps its outputs (they are the model's
    outputs). A group that couples a selected layer with one left out is not offered (the left-out layer keeps its
    channels, so the coupled ones must stay too), nor one that passes through a grouped convolution that is not
    depthwise (removing its channels unevenly would move channels between its groups: not exact).

    Raises:
        ValueError: A module with parameters in a group that this export cannot cut (named, with the ``exclude``
            that leaves it out), or a model the dependency graph cannot trace.
    """
    tp = require_torch_pruning()
    names = {module: name for name, module in model.named_modules()}
    selected = dict(select_modules(model, include, exclude))
    all_layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    if not all_layers:
        raise ValueError("channel groups: the model has no Conv/Linear layer.")
    last = all_layers[-1]
    was_training = model.training
    model.eval()
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    except Exception as err:  # noqa: BLE001 - the tracer's own error, re-raised with what to do
        raise ValueError(
            f"Torch-Pruning's dependency graph could not trace the model ({type(err).__name__}: {err}); leave the "
            "layers involved out with `exclude`."
        ) from err
    finally:
        model.train(was_training)
    ignored = [m for m in all_layers if m is last or names[m] not in selected]
    groups = []
    for group in graph.get_all_groups(
        ignored_layers=ignored, root_module_types=(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    ):
        root_module = group.items[0].dep.target.module
        root = ChannelGroup(root=names[root_module], channels=len(group.items[0].idxs))
        coupled_with_ignored = False
        for item in group.items:
            module = item.dep.target.module
            if module not in names or not any(True for _ in module.parameters(recurse=False)):
                continue  # an operation node (addition, activation, concatenation): nothing to mask
            if not isinstance(module, SUPPORTED):
                raise ValueError(
                    f"channel groups: {names[module]!r} ({type(module).__name__}) holds channels coupled with "
                    f"{root.root!r}, and this export cannot cut its parameters; leave it out with "
                    f"exclude=[{root.root!r}] (or a pattern that matches the layers feeding it)."
                )
            side = "out" if item.dep.handler.__name__ == "prune_out_channels" else "in"
            if side == "out" and module in ignored and module is not root_module:
                coupled_with_ignored = True
            per_channel: list[list[int]] = [[] for _ in range(root.channels)]
            for idx, root_idx in zip(item.idxs, item.root_idxs, strict=True):
                per_channel[int(root_idx)].append(int(idx))
            root.members.append(Member(names[module], module, side, per_channel))
        grouped = [
            m.name for m in root.members if 1 < getattr(m.module, "groups", 1) < getattr(m.module, "in_channels", 0)
        ]
        if grouped:
            warnings.warn(
                f"channel groups: the channels of {root.root!r} pass through the grouped convolution "
                f"{grouped[0]!r}, whose channels cannot be removed exactly one by one: they stay.",
                UserWarning,
                stacklevel=2,
            )
        elif not coupled_with_ignored:
            groups.append(root)
    return groups


def slices(member: Member) -> list[tuple[Any, int]]:
    """(parameter, dimension) that hold the member's channels."""
    module = member.module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return [(p, 0) for p in (module.weight, module.bias) if p is not None]
    if member.side == "out":
        return [(p, 0) for p in (module.weight, getattr(module, "bias", None)) if p is not None]
    if getattr(module, "groups", 1) > 1:
        return []  # a grouped convolution's inputs: its weight holds in/groups columns; the zeroed producer suffices
    return [(module.weight, 1)]


def group_scores(groups: Sequence[ChannelGroup]) -> list[Tensor]:
    """Per group, each channel's L2 norm over every parameter it is coupled to (its outputs' weights, bias and
    BatchNorm scale and shift, and the next layers' input weights), averaged over the parameters."""
    scores = []
    for group in groups:
        total = torch.zeros(group.channels)
        for member in group.members:
            for param, dim in slices(member):
                flat = param.detach().float().transpose(0, dim).reshape(param.shape[dim], -1).cpu()
                per_index = flat.pow(2).sum(1)
                total += torch.tensor([float(per_index[idx].sum()) for idx in member.indices]).sqrt()
        scores.append(total / max(1, sum(len(slices(m)) for m in group.members)))
    return scores


#: Per group, every parameter slice coupled to its channels: (parameter, dimension, indices along it, channel of each).
GradientPlan = list[list[tuple[Tensor, int, Tensor, Tensor]]]


def gradient_plan(groups: Sequence[ChannelGroup]) -> GradientPlan:
    """Where each group's channels sit in its coupled parameters, as index tensors, so that
    :func:`channel_products` gathers a step's per-channel ``Σ w·∂L/∂w`` without Python loops over channels."""
    plan: GradientPlan = []
    for group in groups:
        entries = []
        for member in group.members:
            for param, dim in slices(member):
                src = [i for idx in member.indices for i in idx]
                dst = [c for c, idx in enumerate(member.indices) for _ in idx]
                device = param.device
                entries.append((param, dim, torch.tensor(src, device=device), torch.tensor(dst, device=device)))
        plan.append(entries)
    return plan


def channel_products(plan: GradientPlan, channels: Sequence[int]) -> list[Tensor] | None:
    """Per group, each channel's ``Σ w·∂L/∂w`` over all its coupled parameters (current gradients), or ``None`` when a
    gradient is not finite (a step the AMP scaler skips)."""
    per_param: dict[tuple[int, int], Tensor | None] = {}
    out = []
    for entries, count in zip(plan, channels, strict=True):
        total = None
        for param, dim, src, dst in entries:
            key = (id(param), dim)
            if key not in per_param:
                grad = param.grad
                per_param[key] = (
                    None
                    if grad is None
                    else (param.detach() * grad).float().transpose(0, dim).reshape(param.shape[dim], -1).sum(1)
                )
            product = per_param[key]
            if product is None:
                continue
            if total is None:
                total = torch.zeros(count, device=product.device)
            total.index_add_(0, dst, product[src])
        out.append(torch.zeros(count, device=entries[0][0].device if entries else None) if total is None else total)
    if out and not bool(torch.isfinite(torch.stack([t.sum() for t in out])).all()):  # one check (one sync) per step
        return None
    return out


def group_keep(
    groups: Sequence[ChannelGroup],
    scores: Sequence[Tensor],
    sparsity: float,
    scope: str = "global",
    own: Mapping[int, float] | None = None,
    round_to: int | None = None,
) -> list[Tensor]:
    """Per group, a boolean keep-mask over its channels that removes ``sparsity`` of all channels: the lowest scores
    in one global ranking (``scope="global"``, scores normalised per group by their mean) or in each group
    (``"layer"``). ``own``: group index → its own sparsity, ranked within the group and left out of the global
    ranking. ``round_to`` (``scope="layer"``): each group keeps a multiple of this many channels (the nearest to
    its target; at least one multiple) — CPU convolution kernels work on channel blocks (ONNX Runtime's in 8), and a
    layer left with 11 channels runs hardly faster than one with 16. A group always keeps at least one channel.

    Raises:
        ValueError: A sparsity outside [0, 1), an unknown ``scope``, or ``round_to`` below 1 or with the global scope.
    """
    sparsity = float(check_number("sparsity", sparsity, 0, 1, high_open=True))
    own = {i: float(check_number("sparsity", v, 0, 1, high_open=True)) for i, v in dict(own or {}).items()}
    if scope not in ("global", "layer"):
        raise ValueError(f"`scope` must be 'global' or 'layer', got {scope!r}.")
    block = check_number("round_to", round_to, 1, integer=True, optional=True)
    if block is not None and scope != "layer":
        raise ValueError("`round_to` rounds each group's kept channels: it needs scope='layer'.")
    keep = [torch.ones(g.channels, dtype=torch.bool) for g in groups]
    ranked_alone = set(own) if scope == "global" else set(range(len(groups)))
    for i in ranked_alone:
        n = len(scores[i])
        remove = min(math.floor(own.get(i, sparsity) * n), n - 1)
        if block is not None and n > block:
            kept = max(int(block), int(round((n - remove) / block)) * int(block))
            remove = n - min(kept, n)
        keep[i][torch.argsort(scores[i], stable=True)[:remove]] = False
    rest = [i for i in range(len(groups)) if i not in ranked_alone]
    if not rest:
        return keep
    normalised = [scores[i] / scores[i].mean().clamp_min(1e-12) for i in rest]
    order = torch.argsort(torch.cat(normalised), stable=True)
    offsets = torch.tensor([0] + [len(s) for s in normalised]).cumsum(0)
    remaining = [len(s) for s in normalised]
    budget = math.floor(sparsity * sum(remaining))
    for position in order.tolist():
        if budget == 0:
            break
        g = int(torch.searchsorted(offsets, position, right=True)) - 1
        if remaining[g] == 1:
            continue  # never a whole group
        keep[rest[g]][position - int(offsets[g])] = False
        remaining[g] -= 1
        budget -= 1
    return keep


def group_index(groups: Sequence[ChannelGroup], keep: Sequence[Tensor]) -> list[tuple[Tensor, int, Tensor]]:
    """(parameter, dimension, indices to zero) for every parameter slice of the removed channels: what
    :func:`apply_group_masks_` writes, precomputed for re-applying after every optimizer step."""
    index = []
    for group, mask in zip(groups, keep, strict=True):
        removed = (~mask.cpu()).nonzero().flatten().tolist()
        for member in group.members:
            indices = [i for c in removed for i in member.indices[c]]
            if indices:
                for param, dim in slices(member):
                    index.append((param, dim, torch.tensor(indices, dtype=torch.long, device=param.device)))
    return index


@torch.no_grad()
def apply_group_masks_(groups: Sequence[ChannelGroup], keep: Sequence[Tensor]) -> None:
    """Zero, in place, every parameter slice of the removed channels (shapes unchanged)."""
    for param, dim, indices in group_index(groups, keep):
        param.index_fill_(dim, indices, 0.0)


def weight_masks(weights: Mapping[str, Tensor], index: Sequence[tuple[Tensor, int, Tensor]]) -> dict[str, Tensor]:
    """Each layer's weight mask implied by removed channel groups (``index`` from :func:`group_index`): rows of removed
    outputs, columns of removed inputs."""
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    for param, dim, indices in index:
        for name, weight in weights.items():
            if param is weight:
                masks[name].index_fill_(dim, indices.to(weight.device), False)
    return masks


@accepts_compiled()
def prune_channel_groups_(
    model: nn.Module,
    example_input: Tensor,
    sparsity: float,
    scope: str = "global",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    round_to: int | None = None,
) -> tuple[list[ChannelGroup], list[Tensor]]:
    """Remove ``sparsity`` of the channels of ``model`` by group, once, in place (weights zeroed, shapes kept): the
    Trainer-free, one-shot form — prune, fine-tune with ``apply_group_masks_(groups, keep)`` after every optimizer
    step, then :func:`~lightning_compress.export_compact`. Returns the groups (their ``members`` name every coupled
    layer) and their keep-masks. ``round_to``: see :func:`group_keep`. The arguments are checked as
    :class:`~lightning_compress.PruningConfig` checks them (``granularity="channel"``); ``prune_`` with that config is
    the same operation.

    Raises:
        ValueError: As :func:`channel_groups` and :func:`group_keep`; also when no group can be pruned.
    """
    from lightning_compress.core.configs import PruningConfig
    from lightning_compress.pruning.functional import pruned
    from lightning_compress.pruning.strategies import ChannelGroupMasks

    config = PruningConfig(final_sparsity=sparsity, granularity="channel", scope=scope, include=include,  # type: ignore[arg-type]
                           exclude=exclude, round_to=round_to)  # fmt: skip
    strategy = pruned(model, config, example_input)
    assert isinstance(strategy, ChannelGroupMasks)
    return strategy.groups, strategy.keep
