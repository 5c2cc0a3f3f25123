"""The compact export: the network with every zeroed channel group physically removed, proven equal.

Training keeps the user's shapes (masks zero whole channel groups, :mod:`lightning_compress.pruning.groups`);
:func:`export_compact` builds the smaller network through Torch-Pruning's dependency graph and checks on an example
input that it computes what the masked model computes, raising instead of returning a network that does not.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from lightning_compress.export.onnx import ExportMismatchError
from lightning_compress.pruning.groups import ChannelGroup, channel_groups, require_torch_pruning, slices

__all__ = ["ExportMismatchError", "export_compact"]


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


def export_compact(
    model: nn.Module, example_input: Tensor, atol: float = 1e-4, check_inputs: Iterable[Tensor] | None = None
) -> nn.Module:
    """A physically smaller copy of ``model`` with every zeroed channel group cut out, checked to compute what
    ``model`` computes on ``example_input`` and on every batch of ``check_inputs`` (e.g. a whole test split): largest
    absolute output difference at most ``atol``, returned as ``compact.max_abs_difference``. The model itself is not
    changed.

    Raises:
        ValueError: A channel zeroed in some of its coupled layers only (named), or a group that would be emptied.
        ExportMismatchError: The compact network's outputs differ by more than ``atol`` (the difference named).
    """
    tp = require_torch_pruning()
    was_training = model.training
    compact = copy.deepcopy(model).eval()
    names = dict(compact.named_modules())
    plan = []
    for group in channel_groups(compact, example_input):
        removed = _removed_channels(group)
        if len(removed) == group.channels:
            raise ValueError(f"export_compact: every channel of {group.root!r} is zero; a layer cannot be emptied.")
        if removed:
            plan.append((group.root, removed))
    graph = tp.DependencyGraph().build_dependency(compact, example_inputs=example_input, verbose=False)
    for root, removed in plan:
        module = names[root]
        handler = tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels
        graph.get_pruning_group(module, handler, removed).prune()
    device = example_input.device
    model.eval()
    difference = 0.0
    try:
        with torch.no_grad():
            for x in itertools.chain([example_input], check_inputs or []):
                x = x.to(device)
                difference = max(difference, float((compact(x).float() - model(x).float()).abs().max()))
    finally:
        model.train(was_training)
    if difference > atol:
        raise ExportMismatchError(
            f"export_compact: the compact network's outputs differ from the model's by up to {difference:.3g} "
            f"(> atol={atol}) on the checked inputs; nothing was returned."
        )
    compact.max_abs_difference = difference  # type: ignore[assignment]
    return compact
