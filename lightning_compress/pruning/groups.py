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
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.checks import check_number
from lightning_compress.core.compiled import accepts_compiled
from lightning_compress.core.layout import LAYER_TYPES
from lightning_compress.core.selection import EMBEDDINGS_REFUSED, inside, select_modules

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
    """The channels of ``root`` (a Conv/Linear) and every parameter slice coupled to them. For the heads of an
    attention module (``host``: its name), the channels are its heads: each one's rows of the query, key and value
    projections and its columns of the output projection."""

    root: str
    channels: int
    members: list[Member] = field(default_factory=list)
    host: str | None = None

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

    A group whose channels reach a module with parameters that cannot be cut one channel at a time — a LayerNorm or
    RMSNorm (the residual width of a transformer or ConvNeXt: its statistics would change), an embedding, an attention
    kernel — is left out, all such groups named in one warning; the others (a transformer's MLP hidden neurons, a
    CNN's inner channels) are offered as usual, and so are the heads of the attention modules holding selected layers
    (:func:`head_groups`: one group per module, one channel per head).

    Raises:
        ValueError: A model the dependency graph cannot trace (whole, or the smallest module holding the selected
            layers: ``include`` limits what is traced when the whole model cannot be).
    """
    tp = require_torch_pruning()
    names = {module: name for name, module in model.named_modules()}
    selected, attention = prunable_layers(model, include, exclude)
    heads, dense = head_groups(model, example_input, attention)
    if dense:
        warnings.warn(
            f"channel groups: {len(dense)} attention module(s) keep all their heads: {'; '.join(dense[:8])}"
            f"{' …' if len(dense) > 8 else ''}. Their projections stay dense; the other layers (a transformer's MLP "
            "hidden neurons) are pruned as usual.",
            UserWarning,
            stacklevel=2,
        )
    if not selected:
        return heads
    was_training = model.training
    model.eval()
    try:
        scope, graph = dependency_graph(tp, model, example_input, list(selected))
    finally:
        model.train(was_training)
    traced = model.get_submodule(scope) if scope else model
    all_layers = [m for m in traced.modules() if isinstance(m, LAYER_TYPES)]
    last = all_layers[-1]  # its outputs leave what is traced: they stay
    ignored = [m for m in all_layers if m is last or names[m] not in selected]
    groups, blocked = [], []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=LAYER_TYPES):
        root_module = group.items[0].dep.target.module
        root = ChannelGroup(root=names[root_module], channels=len(group.items[0].idxs))
        coupled_with_ignored = False
        for item in group.items:
            module = item.dep.target.module
            if module not in names or not any(True for _ in module.parameters(recurse=False)):
                continue  # an operation node (addition, activation, concatenation): nothing to mask
            if not isinstance(module, SUPPORTED):
                blocked.append(f"{root.root!r} (through {names[module]!r}, {type(module).__name__})")
                break
            side = "out" if item.dep.handler.__name__ == "prune_out_channels" else "in"
            if side == "out" and module in ignored and module is not root_module:
                coupled_with_ignored = True
            per_channel: list[list[int]] = [[] for _ in range(root.channels)]
            for idx, root_idx in zip(item.idxs, item.root_idxs, strict=True):
                per_channel[int(root_idx)].append(int(idx))
            root.members.append(Member(names[module], module, side, per_channel))
        else:
            grouped = [
                m.name for m in root.members if 1 < getattr(m.module, "groups", 1) < getattr(m.module, "in_channels", 0)
            ]
            if not grouped and not coupled_with_ignored:
                groups.append(root)
            elif grouped:
                warnings.warn(
                    f"channel groups: the channels of {root.root!r} pass through the grouped convolution "
                    f"{grouped[0]!r}, whose channels cannot be removed exactly one by one: they stay.",
                    UserWarning,
                    stacklevel=2,
                )
    if blocked:
        message = (
            f"channel groups: {len(blocked)} group(s) stay dense because their channels reach a module whose "
            "parameters cannot be cut one channel at a time (a LayerNorm/RMSNorm: the residual width, whose statistics "
            f"would change; an embedding; an attention kernel): {', '.join(blocked[:10])}"
            f"{f' and {len(blocked) - 10} more' if len(blocked) > 10 else ''}."
        )
        warnings.warn(message + " The other groups are pruned as usual.", UserWarning, stacklevel=2)
    return groups + heads


#: Attributes that hold an attention module's number of heads, or the size of one head (Hugging Face's, timm's, ours).
HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads")
HEAD_DIMS = ("head_dim", "attention_head_size", "head_size")


def _attention_hosts(model: nn.Module, layers: Sequence[str]) -> list[str]:
    """The outermost attention modules holding some of ``layers``."""
    hosts = [n for n, m in model.named_modules() if n and _is_attention(m)]
    outer = [h for h in hosts if not any(h.startswith(f"{o}.") for o in hosts)]
    return [h for h in outer if any(n.startswith(f"{h}.") for n in layers)]


Call = tuple[str, nn.Module, Tensor]


def _calls(model: nn.Module, hosts: Sequence[str], example_input: Tensor) -> dict[str, list[Call]]:
    """Per host, the Linear layers inside it in the order they run on ``example_input`` (one forward, in evaluation),
    each with its name in the host and its input (first call)."""
    seen: dict[str, list[Call]] = {h: [] for h in hosts}
    handles = []
    for host in hosts:
        for name, module in model.get_submodule(host).named_modules():
            if isinstance(module, nn.Linear):

                def record(m: nn.Module, args: tuple[Any, ...], host: str = host, name: str = name) -> None:
                    if args and isinstance(args[0], Tensor) and all(n != name for n, _, _ in seen[host]):
                        seen[host].append((name, m, args[0]))

                handles.append(module.register_forward_pre_hook(record))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return seen


def _head_count(host: nn.Module, width: int) -> int | None:
    """The number of heads of an attention module whose projections are ``width`` wide, read from its attributes (or
    its config's): a head count, or a head size."""
    for module in (*host.modules(), getattr(host, "config", None)):
        for attr, per_head in [(a, False) for a in HEAD_COUNTS] + [(a, True) for a in HEAD_DIMS]:
            value = getattr(module, attr, None)
            if attr == "heads" and isinstance(value, nn.Module):
                continue
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= width and width % value == 0:
                return width // value if per_head else value
    return None


def head_groups(model: nn.Module, example_input: Tensor, layers: Sequence[str]) -> tuple[list[ChannelGroup], list[str]]:
    """The heads of the attention modules holding the selected ``layers``, as channel groups (one channel per head:
    its rows of the query, key and value projections — three ``nn.Linear`` reading the same input — and its columns
    of the output projection, the Linear that then reads their heads' output), and the attention modules whose heads
    stay, each with why: fused q/k/v projections (GPT-2's ``c_attn``, timm's ``qkv``), an attention kernel that reads
    its weights itself (``nn.MultiheadAttention``), grouped-query attention (keys and values shared by several query
    heads), an unknown number of heads, or projections not all selected.

    Removing a head is exact: its query, key and value rows and its output columns go together, and an attention
    module that splits its projections with ``reshape(…, -1, head_dim)`` (Hugging Face's BERT, Llama) computes with
    the heads that remain (:func:`~lightning_compress.export.compact.export_compact` updates head counts it finds
    and checks the compact network)."""
    groups: list[ChannelGroup] = []
    dense: list[str] = []
    chosen = set(layers)
    hosts = _attention_hosts(model, layers)
    kernels = [h for h in hosts if isinstance(model.get_submodule(h), nn.MultiheadAttention)]
    dense += [f"{h!r} (nn.MultiheadAttention: its kernel reads the q/k/v weights itself)" for h in kernels]
    traced = _calls(model, [h for h in hosts if h not in kernels], example_input) if len(hosts) > len(kernels) else {}
    for host_name, calls in traced.items():
        host = model.get_submodule(host_name)
        by_input: dict[int, list[Call]] = {}
        for call in calls:
            by_input.setdefault(id(call[2]), []).append(call)
        qkv = next((c for c in by_input.values() if len(c) == 3), None)
        if qkv is None:
            dense.append(f"{host_name!r} (no three q/k/v projections reading one input: fused or unrecognised)")
            continue
        widths = {int(m.out_features) for _, m, _ in qkv}  # type: ignore[arg-type]
        width = int(qkv[0][1].out_features)  # type: ignore[arg-type]
        if len(widths) > 1:
            dense.append(f"{host_name!r} (grouped-query attention: keys and values serve several query heads)")
            continue
        last = max(i for i, c in enumerate(calls) if any(c is q for q in qkv))
        out = next((c for c in calls[last + 1 :] if c[1].in_features == width), None)  # type: ignore[attr-defined]
        heads = _head_count(host, width)
        full = [f"{host_name}.{n}" for n, _, _ in qkv]
        if out is None or heads is None or heads < 2:
            dense.append(
                f"{host_name!r} ({'no output projection found' if out is None else 'number of heads unknown'})"
            )
            continue
        if not set(full) <= chosen:
            dense.append(f"{host_name!r} (its q/k/v projections are not all selected: {sorted(set(full) - chosen)})")
            continue
        size = width // heads
        rows = [list(range(h * size, (h + 1) * size)) for h in range(heads)]
        group = ChannelGroup(root=full[0], channels=heads, host=host_name)
        group.members = [Member(n, m, "out", rows) for n, (_, m, _) in zip(full, qkv, strict=True)]
        group.members.append(Member(f"{host_name}.{out[0]}", out[1], "in", rows))
        groups.append(group)
    return groups, dense


def dependency_graph(tp: Any, model: nn.Module, example_input: Tensor, selected: Sequence[str]) -> tuple[str, Any]:
    """Torch-Pruning's dependency graph of ``model`` — or, when the whole model cannot be traced (GPT-2, models with
    data-dependent control flow), of the smallest module holding the ``selected`` layers, on the inputs it receives.
    Returns the traced module's name (``""``: the model) and the graph."""
    if not any(isinstance(m, LAYER_TYPES) for m in model.modules()):
        raise ValueError("channel groups: the model has no Conv/Linear layer.")
    try:
        return "", tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    except Exception as err:  # noqa: BLE001 - the tracer's own error, re-raised below with what to do
        failure: Exception = err
    scope = _scope(selected)
    if scope:
        try:
            inputs = _inputs_of(model, model.get_submodule(scope), example_input)
            return scope, tp.DependencyGraph().build_dependency(
                model.get_submodule(scope), example_inputs=inputs, verbose=False
            )
        except Exception as err:  # noqa: BLE001
            failure = err
    where = f"the model, nor module {scope!r} (the smallest holding the selected layers)" if scope else "the model"
    parent = selected[0].rpartition(".")[0]
    example = f"include=r'^{re.escape(parent)}\\.'" if parent and parent != scope else "include=[...]"
    raise ValueError(
        f"Torch-Pruning's dependency graph could not trace {where} ({type(failure).__name__}: {failure}). When the "
        f"whole model cannot be traced, the smallest module holding every selected layer is: select fewer layers with "
        f"`include` (e.g. {example}), or use an unstructured or N:M granularity."
    ) from failure


def _is_attention(module: nn.Module) -> bool:
    """``nn.MultiheadAttention``, or any module whose class name ends in ``Attention`` (Hugging Face's, timm's): the
    output channels of the layers inside it are attention heads."""
    return isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith("Attention")


def prunable_layers(
    model: nn.Module, include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None
) -> tuple[dict[str, nn.Module], list[str]]:
    """The layers channel groups may be rooted at — those ``include`` / ``exclude`` select, less the layers inside
    attention modules — and the names of those left out for being inside one. :func:`channel_groups` and the compact
    export both select (and trace) with it."""
    selected = dict(select_modules(model, include, exclude, refuse_embeddings=EMBEDDINGS_REFUSED["channel"]))
    heads = inside(model, _is_attention)
    attention = [name for name in selected if name in heads]
    return {n: m for n, m in selected.items() if n not in heads}, attention


def _scope(names: Sequence[str]) -> str:
    """The name of the smallest module that holds every named layer (``""``: the model itself)."""
    if not names:
        return ""
    parts = [name.split(".") for name in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    if len(names) == 1 or common == parts[0]:
        common = common[:-1]  # a layer itself is no scope: its parent is
    return ".".join(common)


def _inputs_of(model: nn.Module, module: nn.Module, example_input: Tensor) -> Any:
    """The inputs ``module`` receives when ``model`` runs on ``example_input`` (a tuple, or a dict of arguments by
    name when it is called with keywords), for tracing it alone."""
    import inspect

    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def record(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not seen:
            seen.append((args, kwargs))

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"it does not run when the model runs on the example input: {type(module).__name__}")
    args, kwargs = seen[0]
    if not kwargs:
        return args
    return dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)


#: The attribute that marks the layers of a pruned channel group, so that the compact export cuts the groups a
#: technique pruned (and only those) without being told again — like the ranks of low-rank layers.
GROUP_ATTRIBUTE = "_lc_channel_group"


def record_groups(groups: Sequence[ChannelGroup]) -> None:
    """Mark every layer whose outputs are channels of one of ``groups`` (:func:`recorded_group_layers` finds them
    again, on the model or a copy)."""
    for group in groups:
        for member in group.outputs():
            if not isinstance(member.module, nn.modules.batchnorm._BatchNorm):  # the layers, not their BatchNorms
                member.module.__dict__[GROUP_ATTRIBUTE] = True


def recorded_group_layers(model: nn.Module) -> list[str]:
    """Names of the layers of ``model`` whose outputs are channels of a group a technique pruned
    (:func:`record_groups`): selecting them gives the same groups again."""
    return [name for name, module in model.named_modules() if module.__dict__.get(GROUP_ATTRIBUTE)]


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
