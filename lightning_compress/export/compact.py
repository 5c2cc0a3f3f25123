"""The compact export: the network with every zeroed channel group physically removed and every low-rank layer
replaced by its two factors, proven equal.

Training keeps the user's shapes (masks zero whole channel groups, :mod:`lightning_compress.pruning.groups`; low-rank
projections, :mod:`lightning_compress.lowrank`); :func:`export_compact` builds the smaller network — channels cut
through Torch-Pruning's dependency graph, layers factorized by SVD — and checks on an example input that it computes
what the trained model computes, raising instead of returning a network that does not.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.compiled import accepts_compiled
from lightning_compress.core.layout import matrix_weight
from lightning_compress.core.lowrank import layer_info, recorded_ranks
from lightning_compress.export.onnx import PARITY_GOAL, ExportMismatchError
from lightning_compress.pruning.groups import (
    HEAD_COUNTS,
    ChannelGroup,
    channel_groups,
    dependency_graph,
    prunable_layers,
    recorded_group_layers,
    require_torch_pruning,
    slices,
)
from lightning_compress.quantization.prepare import float_phase, quantized_layers

__all__ = ["ExportMismatchError", "export_compact", "factorize"]

Selection = str | Sequence[str] | None


@torch.no_grad()
def factorize(module: nn.Module, rank: int, name: str = "layer") -> nn.Sequential:
    """``module`` (a Linear or ungrouped convolution) as two layers through a rank-``rank`` truncated SVD of its weight
    matrix: two Linears, or a convolution with the original kernel, stride, padding and dilation to ``rank`` channels
    followed by a 1×1 convolution that carries the bias. Exact when the weight has rank ``rank`` at most.

    Raises:
        ValueError: ``rank`` ≤ 0, or at/above the break-even rank (the factors would not be smaller) — named.
    """
    info = layer_info(name, module)
    if not 1 <= rank <= info.break_even:
        raise ValueError(
            f"rank {rank} for layer {name!r} ({info.rows}×{info.cols}) must be in [1, {info.break_even}] (full rank "
            f"{info.full_rank}; from {info.break_even + 1} on the two factors are not smaller than the layer)."
        )
    weight = matrix_weight(module)  # (out, in·k…), also for a Linear-like layer that stores it transposed
    u, s, vh = torch.linalg.svd(weight.reshape(info.rows, -1).double(), full_matrices=False)
    root = s[:rank].sqrt()
    left = (u[:, :rank] * root).to(weight.dtype)  # (out, r)
    right = (root[:, None] * vh[:rank]).to(weight.dtype)  # (r, in·k…)
    bias = getattr(module, "bias", None)
    first: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
    second: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):  # a Linear, or a Linear-like layer: two Linears
        first = nn.Linear(info.cols, rank, bias=False)
        second = nn.Linear(rank, info.rows, bias=bias is not None)
    else:
        conv = type(module)
        shape: dict[str, Any] = {"kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding,
                                 "dilation": module.dilation, "padding_mode": module.padding_mode}  # fmt: skip
        first = conv(module.in_channels, rank, bias=False, **shape)
        second = conv(rank, module.out_channels, 1, bias=bias is not None)
    first.weight.copy_(right.reshape(first.weight.shape))
    second.weight.copy_(left.reshape(second.weight.shape))
    if isinstance(bias, Tensor) and isinstance(second.bias, Tensor):
        second.bias.copy_(bias.detach())
    return nn.Sequential(first, second).to(weight.device).train(module.training)


def _is_zero(param: Tensor, dim: int, indices: list[int]) -> bool:
    return bool(param.detach().index_select(dim, torch.tensor(indices, dtype=torch.long)).eq(0).all())


def _removed_channels(group: ChannelGroup) -> list[int]:
    """The group's channels whose output parameters are all exactly zero; refuses a channel zeroed in some of its
    coupled layers but not in all (masks edited by hand, or a layer's own mask)."""
    removed = []
    for channel in range(group.channels):
        members = [m for m in group.outputs() if m.indices[channel]]  # a concatenation's parts hold some channels
        zero = [
            all(_is_zero(param, dim, member.indices[channel]) for param, dim in slices(member)) for member in members
        ]
        if all(zero):
            removed.append(channel)
        elif zero[0]:
            live = [m.name for m, z in zip(members, zero, strict=True) if not z]
            raise ValueError(
                f"export_compact: channel {channel} of {group.root!r} is zero there but not in the layers it is "
                f"coupled with ({', '.join(live)}): cutting it out would change the model. Prune by channel groups "
                "(apply_group_masks_, MagnitudePruning granularity='channel') so that a channel goes as a whole."
            )
    return removed


@accepts_compiled()
def export_compact(
    model: nn.Module,
    example_input: Tensor,
    atol: float = 1e-4,
    check_inputs: Iterable[Tensor] | None = None,
    ranks: Mapping[str, int] | None = None,
    channels: bool | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> nn.Module:
    """A physically smaller copy of ``model``, checked to compute what ``model`` computes.

    Every zeroed channel group is cut out (``channels``; needs ``torch-pruning``) and every layer named in ``ranks``
    is replaced by its two low-rank factors (:func:`factorize`). The groups are those rooted at the layers ``include``
    / ``exclude`` select (as for :func:`~lightning_compress.prune_`); without them, the groups a channel pruning
    marked on the model (:class:`~lightning_compress.MagnitudePruning` and :func:`~lightning_compress.prune_` with
    ``granularity="channel"`` do), so the export cuts what the technique pruned and never refuses what it accepted.
    ``channels=None`` cuts channel groups when some are marked, or when there are no ``ranks`` (a model zeroed some
    other way); ``True`` always, ``False`` never. ``ranks=None`` takes the ranks the layers carry
    (:class:`~lightning_compress.LowRankFactorization` and :func:`~lightning_compress.low_rank_` mark them);
    ``ranks={}`` factorizes nothing. The check runs on
    ``example_input`` and on every batch of ``check_inputs`` (e.g. a whole test split): the largest absolute output
    difference must be at most ``atol``; it is returned as ``compact.max_abs_difference``. A model prepared for
    quantization-aware training keeps its quantizers (per-channel weight ranges cut with the channels; export it with
    :func:`~lightning_compress.export_onnx`): it is compared with the quantizers off, and quantized by top-1 agreement
    (at least :data:`~lightning_compress.export.onnx.PARITY_GOAL`, returned as ``compact.quantized_top1_agreement``),
    since cutting zero channels changes the order of float sums and a value on a rounding tie may land one step away.
    The model itself is not changed.

    Raises:
        ValueError: A channel zeroed in some of its coupled layers only (named), a group that would be emptied, a rank
            out of range or a name in ``ranks`` that is no layer of the model.
        ExportMismatchError: The compact network's outputs differ by more than ``atol`` (the difference named) — e.g.
            a layer in ``ranks`` whose weight is not of that rank.
    """
    if ranks is None:  # the ranks a low-rank technique left on the layers (an argument overrides them)
        ranks = recorded_ranks(model) or None
    compact = copy.deepcopy(model).eval()
    names = dict(compact.named_modules())
    unknown = sorted(set(ranks or {}) - set(names))
    if unknown:
        raise ValueError(f"export_compact: `ranks` names layers the model does not have: {unknown}.")
    quantized = quantized_layers(compact)
    if quantized and ranks:
        raise ValueError(
            f"export_compact: the model is prepared for quantization-aware training and `ranks` asks to factorize "
            f"{sorted(ranks)}: the two factors would have no quantizers. Export the low-rank model without QAT."
        )
    marked = recorded_group_layers(compact)
    if include is None and exclude is None and marked:
        include = [f"^{re.escape(name)}$" for name in marked]
    if channels or (channels is None and (marked or not ranks)):
        if quantized:
            _cut_quantized_channels(compact, quantized, example_input, include, exclude)
        else:
            _cut_channels(compact, example_input, include, exclude)
    for name, rank in (ranks or {}).items():  # after the cuts: a cut layer's remaining rows/columns keep its rank
        parent, _, child = name.rpartition(".")
        setattr(compact.get_submodule(parent) if parent else compact, child, factorize(names[name], int(rank), name))
    difference, agreement = _compare(model, compact, itertools.chain([example_input], check_inputs or []))
    if difference > atol:
        raise ExportMismatchError(
            f"export_compact: the compact network's outputs differ from the model's by up to {difference:.3g} "
            f"(> atol={atol}{', quantizers off' if quantized else ''}) on the checked inputs; nothing was returned."
        )
    if agreement is not None and agreement < PARITY_GOAL:
        raise ExportMismatchError(
            f"export_compact: quantized, the compact network agrees with the model on {agreement:.2%} of the checked "
            f"predictions (< {PARITY_GOAL:.1%}); nothing was returned."
        )
    compact.max_abs_difference = difference  # type: ignore[assignment]
    compact.quantized_top1_agreement = agreement  # type: ignore[assignment]
    return compact


def _compare(model: nn.Module, compact: nn.Module, inputs: Iterable[Tensor]) -> tuple[float, float | None]:
    """The largest absolute output difference between ``compact`` and ``model`` and, for quantization-aware models,
    their top-1 agreement quantized.

    A quantization-aware model is compared with its quantizers off: cutting zero channels changes the order of the
    float sums, and a value on a rounding tie of a quantizer can then land one step away (0.03 on a ResNet-20's logits
    here) — the same float-order effect as between PyTorch and ONNX Runtime, judged the same way, by top-1 agreement
    (:data:`~lightning_compress.export.onnx.PARITY_GOAL`)."""
    quantized = bool(quantized_layers(model))
    was_training = model.training
    model.eval()
    difference, agree, seen = 0.0, 0, 0
    device = next(iter(model.parameters())).device
    try:
        with torch.no_grad():
            for x in inputs:
                x = x.to(device)
                with float_phase(model, compact) if quantized else contextlib.nullcontext():
                    difference = max(difference, float((compact(x).float() - model(x).float()).abs().max()))
                if quantized:
                    agree += int((compact(x).argmax(-1) == model(x).argmax(-1)).sum())
                    seen += len(x)
    finally:
        model.train(was_training)
    return difference, (agree / seen if quantized else None)


def _cut_quantized_channels(
    compact: nn.Module, layers: dict[str, Any], example_input: Tensor, include: Selection, exclude: Selection
) -> None:
    """:func:`_cut_channels` on a model prepared for quantization-aware training: traced with the quantizers off (the
    plain layers' computation), and each layer's per-output-channel quantizer state (observed ranges, scales,
    zero-points) cut with the layer's output channels. Input and output quantizers are per tensor: unchanged."""
    with float_phase(compact):
        removed = _cut_channels(compact, example_input, include, exclude)
    for name, rows in removed.items():
        if name not in layers:
            continue
        quantizer = layers[name].weight_quantizer
        if not quantizer.spec.per_channel:
            continue
        cut_rows = set(rows)
        keep = torch.tensor([i for i in range(quantizer.min_val.numel()) if i not in cut_rows], dtype=torch.long)
        for key in ("min_val", "max_val", "zero_point", "scale"):
            value = getattr(quantizer, key)
            cut = value.detach().index_select(0, keep.to(value.device))
            if isinstance(value, nn.Parameter):
                setattr(quantizer, key, nn.Parameter(cut, requires_grad=value.requires_grad))
            else:
                setattr(quantizer, key, cut)


def _cut_channels(
    compact: nn.Module, example_input: Tensor, include: Selection = None, exclude: Selection = None
) -> dict[str, list[int]]:
    """Remove, in place, every channel group whose parameters are all zero; returns each layer's removed output rows
    (by module name)."""
    tp = require_torch_pruning()
    names = dict(compact.named_modules())
    plan: list[tuple[ChannelGroup, list[int]]] = []
    heads: list[tuple[ChannelGroup, list[int]]] = []
    rows: dict[str, set[int]] = {}
    for group in channel_groups(compact, example_input, include, exclude):
        removed = _removed_channels(group)
        if len(removed) == group.channels:
            raise ValueError(f"export_compact: every channel of {group.root!r} is zero; a layer cannot be emptied.")
        if removed:
            (heads if group.host is not None else plan).append((group, removed))
            for member in group.outputs():
                rows.setdefault(member.name, set()).update(i for c in removed for i in member.indices[c])
    if plan:
        selected, _ = prunable_layers(compact, include, exclude)  # traced as channel_groups traced it
        _, graph = dependency_graph(tp, compact, example_input, list(selected))
        for group, removed in plan:
            module = names[group.root]
            handler = tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels
            graph.get_pruning_group(module, handler, removed).prune()
    for group, removed in heads:
        _cut_heads(compact, group, removed)
    return {name: sorted(found) for name, found in rows.items()}


@torch.no_grad()
def _cut_heads(compact: nn.Module, group: ChannelGroup, removed: Sequence[int]) -> None:
    """Remove the ``removed`` heads of an attention module in place: their rows of the query, key and value
    projections, their columns of the output projection, and the module's head count (and total head width) where
    it keeps them (:data:`~lightning_compress.pruning.groups.HEAD_COUNTS`, ``all_head_size``)."""
    kept = [h for h in range(group.channels) if h not in set(removed)]
    width = sum(len(i) for i in group.members[0].indices)
    for member in group.members:
        module: Any = member.module
        keep = torch.tensor([i for h in kept for i in member.indices[h]], dtype=torch.long, device=module.weight.device)
        dim = 0 if member.side == "out" else 1
        module.weight = nn.Parameter(module.weight.index_select(dim, keep), module.weight.requires_grad)
        if member.side == "out":
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.index_select(0, keep), module.bias.requires_grad)
            module.out_features = len(keep)
        else:
            module.in_features = len(keep)
    new_width = width * len(kept) // group.channels
    assert group.host is not None
    for module in compact.get_submodule(group.host).modules():
        for attr in HEAD_COUNTS:
            if getattr(module, attr, None) == group.channels and not isinstance(getattr(module, attr), bool):
                setattr(module, attr, len(kept))
        if getattr(module, "all_head_size", None) == width:
            module.all_head_size = new_width
