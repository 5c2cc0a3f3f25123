"""Low-rank factorization without a Trainer: which layers, at which cost, and one-shot projection of any nn.Module."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.compiled import accepts_compiled
from lightning_compress.core.configs import LowRankConfig, resolve_config
from lightning_compress.core.layout import matrix_weight
from lightning_compress.core.lowrank import (
    LowRankLayer,
    check_budget,
    choose_ranks,
    layer_info,
    normalized_spectrum,
    project_rank_,
    record_ranks,
)
from lightning_compress.core.selection import (
    check_overrides_match,
    inside,
    match_overrides,
    select_for,
    weights_of,
)


def output_positions(model: nn.Module, example: Tensor, selected: Sequence[tuple[str, nn.Module]]) -> dict[str, int]:
    """Output positions per sample of each selected layer (a convolution's output pixels, a Linear's tokens), from
    one forward pass on the first sample of ``example`` (the model's mode and random streams are left as they were)."""
    seen: dict[str, int] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: Any, output: Tensor) -> None:
            channels = int(matrix_weight(module).shape[0])  # output channels / features
            seen[name] = output.numel() // (output.shape[0] * channels)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in selected]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            model(example[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return seen


def low_rank_layers(
    model: nn.Module,
    config: LowRankConfig,
    example_input: Tensor | None = None,
    selected: Sequence[tuple[str, nn.Module]] | None = None,
) -> tuple[list[tuple[str, nn.Module]], list[LowRankLayer], dict[str, int]]:
    """The layers ``config`` selects, their matrix views (with output positions for ``budget="flops"``, traced on
    ``example_input``) and the fixed ranks ``layer_rank`` gives them; the budget is checked at its final ratio (rank 1
    in every layer must meet it). :func:`low_rank_` and :class:`~lightning_compress.LowRankFactorization` both start
    here, so they refuse the same models the same way (the callback passes the layers it ``selected``: frozen ones
    left out).

    Grouped and depthwise convolutions among other layers are left as they are, named in one warning (every selected
    layer grouped is refused).

    Raises:
        ValueError: A layer that cannot be factorized, a ``layer_rank`` pattern matching nothing or a rank above a
            layer's break-even, a FLOPs budget without an example input, a ratio that rank 1 everywhere cannot meet.
    """
    if selected is None:  # the verb (a callback passes the layers it selected, and has said what it leaves)
        selected = select_for(model, config)
    selected = list(selected)
    grouped = [name for name, m in selected if isinstance(m, nn.modules.conv._ConvNd) and m.groups != 1]
    if grouped and len(grouped) < len(selected):  # every layer grouped: refused below, naming the first
        warnings.warn(
            f"{config.technique} leaves {len(grouped)} grouped or depthwise convolution(s) as they are (they are "
            f"already cheap; low rank factorizes Linear and ungrouped convolutions): {', '.join(map(repr, grouped))}.",
            UserWarning,
            stacklevel=2,
        )
        left = set(grouped)
        selected = [(name, m) for name, m in selected if name not in left]
    attention = inside(model, (nn.MultiheadAttention,))
    kernel_read = [name for name, _ in selected if name in attention]
    if kernel_read and len(kernel_read) < len(selected):
        warnings.warn(
            f"{config.technique} leaves {len(kernel_read)} attention output projection(s) as they are: "
            f"nn.MultiheadAttention's kernel reads their weight directly, so two factors cannot replace them: "
            f"{', '.join(map(repr, kernel_read))}.",
            UserWarning,
            stacklevel=2,
        )
        selected = [(name, m) for name, m in selected if name not in attention]
    layer_rank = config.per_layer
    check_overrides_match(selected, layer_rank, "layer_rank")
    positions: dict[str, int] = {}
    if config.budget == "flops":
        if not isinstance(example_input, Tensor):
            raise ValueError(
                "a low-rank budget in FLOPs traces the model on one input to count multiply-adds: pass an example "
                "input (a LightningModule's `example_input_array`, or the first training batch)."
            )
        positions = output_positions(model, example_input, selected)
    layers = [layer_info(n, m, positions.get(n, 1)) for n, m in selected]
    fixed = {}
    for layer in layers:
        rank = match_overrides(layer.name, layer_rank, selected)
        if rank is None:
            continue
        if not 1 <= rank <= layer.break_even:
            raise ValueError(
                f"layer_rank {rank} for layer {layer.name!r} ({layer.rows}×{layer.cols}) must be in "
                f"[1, {layer.break_even}]: from {layer.break_even + 1} on (full rank {layer.full_rank}) its two "
                "factors hold as many weights as the layer."
            )
        fixed[layer.name] = int(rank)
    try:
        check_budget(layers, 1.0 / config.ratio, config.budget, fixed)
    except ValueError as err:
        raise ValueError(f"{config.technique}(ratio={config.ratio:g}): {err}") from None
    return selected, layers, fixed


@torch.no_grad()
@accepts_compiled()
def low_rank_(
    model: nn.Module,
    config: LowRankConfig | float | Mapping[str, Any] | None = None,
    *,
    example_input: Tensor | None = None,
    **fields: Any,
) -> dict[str, int]:
    """One-shot low rank: project the layers ``config`` selects in place onto the ranks that cut their parameters (or
    multiply-adds) ``ratio``-fold, chosen globally (:func:`~lightning_compress.core.lowrank.choose_ranks`). Returns
    the ranks of the layers to factorize; each such layer also carries its rank, so that
    :func:`~lightning_compress.export_compact` factorizes it without being told.

    Args:
        model: Any module.
        config: A :class:`~lightning_compress.LowRankConfig`, or the ``ratio`` alone; keyword ``fields`` of the config
            are accepted too (and override it).
        example_input: One input batch, for ``budget="flops"``.

    Example:
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> ranks = low_rank_(net, LowRankConfig(ratio=2))
        >>> sum(r * (64 + (10 if n == "2" else 64)) for n, r in ranks.items()) <= (64 * 64 + 10 * 64) / 2
        True
    """
    cfg = resolve_config(LowRankConfig, config, "ratio", fields)
    selected, layers, fixed = low_rank_layers(model, cfg, example_input)
    weights = weights_of(selected)
    spectra = {layer.name: normalized_spectrum(weights[layer.name]).cpu() for layer in layers}
    ranks = choose_ranks(layers, spectra, 1.0 / cfg.ratio, cfg.budget, fixed)
    out = {}
    for layer in layers:
        if ranks[layer.name] <= layer.break_even:
            project_rank_(weights[layer.name], ranks[layer.name])
            out[layer.name] = ranks[layer.name]
    record_ranks(dict(selected), out)  # the model carries them: export_compact(model, x) factorizes these layers
    return out
