"""Automatic per-layer weight bits: a quantization sensitivity scan and the cheapest choice under a budget.

Layers differ in how many bits their weights need. :func:`quantization_scan` quantizes one layer's weights at a time
(per output channel, symmetric, min/max — the grid :class:`~lightning_compress.QuantizationAwareTraining` starts from)
at each of a few bit-widths on a trained model, measures the validation loss and accuracy, and restores the layer.
:func:`choose_layer_bits` then gives every layer one of the scanned bit-widths so that the weights meet a budget — an
average number of bits per weight, or a size in bytes — with the least *predicted* loss: the sum of the layers' own
loss increases (each measured alone, made monotone in the bits: :func:`layer_damage`; an exact search over the
layers' choices, not a greedy one).
:func:`write_layer_bits` writes the choice as ``layer_bits.yaml``, which ``QuantizationAwareTraining(layer_bits=...)``
takes as a path, as ``MagnitudePruning`` takes the pruning scan's ``layer_sparsity.yaml``.

As a command: ``lightning-compress-sensitivity sensitivity.kind=quantization sensitivity.average_bits=4``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.analysis.sensitivity import layer_pattern, rows_by_layer
from lightning_compress.core.checks import check_number
from lightning_compress.core.quantizers import QuantSpec, check_bits, fake_quantize, qparams_from_range
from lightning_compress.core.selection import select_modules, weights_of


def check_bit_choices(bits: Sequence[int]) -> list[int]:
    """The bit-widths a scan tries: a non-empty list of integers from 2 to 8."""
    if isinstance(bits, (str, bytes)) or not isinstance(bits, Sequence) or not bits:
        raise ValueError(f"`bits` must be a non-empty list of integers from 2 to 8, got {bits!r}.")
    return sorted({check_bits("bits", b) for b in bits})


@torch.no_grad()
def quantize_weight_(weight: torch.Tensor, bits: int) -> None:
    """Round ``weight`` in place onto a ``bits``-bit grid per output channel (symmetric, from its min/max)."""
    spec = QuantSpec(bits=bits, symmetric=True, per_channel=True, axis=0)
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale, zero_point = qparams_from_range(flat.amin(1), flat.amax(1), spec)
    weight.copy_(fake_quantize(weight.detach(), scale.to(weight.device), zero_point.to(weight.device), spec))


@torch.no_grad()
def quantization_scan(
    model: nn.Module,
    evaluate: Callable[[nn.Module], tuple[float, float]],
    bits: Sequence[int] = (2, 4, 8),
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Quantize every selected layer's weights alone at each of ``bits``, evaluate, restore the layer.

    Args:
        model: A trained model (a LightningModule or any ``nn.Module``); it is left as it was.
        evaluate: ``model -> (loss, accuracy)`` on validation data (e.g.
            :func:`~lightning_compress.core.metrics.evaluate_loss_and_accuracy` on the validation loader).
        bits: The bit-widths to try per layer.
        include, exclude: Which Conv/Linear layers to scan, as in QuantizationAwareTraining.

    Returns:
        ``{"baseline": {"loss", "accuracy"}, "rows": [{"layer", "params", "bits", "loss", "accuracy", "damage"}]}``
        with ``damage`` the loss increase over the float model.

    Example:
        >>> torch.manual_seed(0) is not None
        True
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> scan = quantization_scan(net, lambda m: (float(m[0].weight.abs().sum()), 1.0), [2, 8])
        >>> [(r["layer"], r["bits"]) for r in scan["rows"]]
        [('0', 2), ('0', 8), ('2', 2), ('2', 8)]
    """
    levels = check_bit_choices(bits)
    weights = weights_of(select_modules(model, include, exclude))
    base_loss, base_accuracy = evaluate(model)
    rows = []
    for name, weight in weights.items():
        original = weight.detach().clone()
        for level in levels:
            try:
                quantize_weight_(weight, level)
                loss, accuracy = evaluate(model)
            finally:
                weight.copy_(original)
            rows.append({"layer": name, "params": weight.numel(), "bits": level, "loss": float(loss),
                         "accuracy": float(accuracy), "damage": float(loss) - float(base_loss)})  # fmt: skip
    return {"baseline": {"loss": float(base_loss), "accuracy": float(base_accuracy)}, "rows": rows}


def bits_budget(scan: dict[str, Any], average_bits: float | None = None, size_bytes: float | None = None) -> float:
    """The budget in weight bits of the scanned layers: ``average_bits`` per weight, or ``size_bytes`` × 8.

    Raises:
        ValueError: Neither or both given, or a budget below what the smallest scanned bit-width in every layer takes
            (named with that minimum).
    """
    if (average_bits is None) == (size_bytes is None):
        raise ValueError("Give one budget: `average_bits` (bits per weight) or `size_bytes` (of the weights).")
    params = {r["layer"]: r["params"] for r in scan["rows"]}
    total = sum(params.values())
    smallest = min(r["bits"] for r in scan["rows"])
    if average_bits is not None:
        budget = float(check_number("average_bits", average_bits, 0, low_open=True)) * total
        shown = f"`average_bits`={average_bits:g}"
    else:
        budget = float(check_number("size_bytes", size_bytes, 0, low_open=True)) * 8
        shown = f"`size_bytes`={size_bytes:g}"
    if budget < smallest * total - 1e-9:
        raise ValueError(
            f"{shown} is below what the smallest scanned bit-width ({smallest} bits) in every layer takes "
            f"({smallest} bits per weight, {smallest * total / 8:,.0f} bytes for {total:,} weights): scan fewer bits "
            "or raise the budget."
        )
    return budget


def choose_layer_bits(
    scan: dict[str, Any], average_bits: float | None = None, size_bytes: float | None = None
) -> dict[str, int]:
    """Per scanned layer one of its scanned bit-widths, such that the weights fit the budget (:func:`bits_budget`)
    with the least predicted damage: the sum of each layer's loss increase alone (:func:`layer_damage`); among equal
    damage, the choice with more bits. Exact: the Pareto front of (bits, damage) over the layers taken so far is
    extended one layer at a time. Keys are ``layer_bits`` patterns.

    Example:
        >>> rows = [{"layer": "a", "params": 100, "bits": b, "damage": d} for b, d in [(2, 0.5), (4, 0.1), (8, 0.0)]]
        >>> rows += [{"layer": "b", "params": 100, "bits": b, "damage": d} for b, d in [(2, 0.01), (4, 0.0), (8, 0.0)]]
        >>> choose_layer_bits({"rows": rows}, average_bits=3)
        {'^a$': 4, '^b$': 2}
    """
    budget = bits_budget(scan, average_bits, size_bytes)
    damage_of = layer_damage(scan)
    by_layer = rows_by_layer(scan, "bits")
    # a tie-break far below any measured loss difference: of two choices with the same damage, the one with more bits
    tie = 1e-9 / (8 * sum(r["params"] for r in scan["rows"]))
    front: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]  # (bits used, damage, choice per layer)
    for rows in by_layer.values():
        grown = [
            (
                used + r["params"] * r["bits"],
                damage + damage_of[r["layer"], r["bits"]] - tie * r["params"] * r["bits"],
                (*choice, r["bits"]),
            )
            for used, damage, choice in front
            for r in rows
            if used + r["params"] * r["bits"] <= budget + 1e-9
        ]
        grown.sort(key=lambda t: (t[0], t[1]))
        front = []
        for state in grown:  # keep only states that lose less than every cheaper one
            if not front or state[1] < front[-1][1] - 1e-15:
                front.append(state)
    _, _, choice = min(front, key=lambda t: (t[1], t[0]))
    return {layer_pattern(layer): bits for layer, bits in zip(by_layer, choice, strict=True)}


def layer_damage(scan: dict[str, Any]) -> dict[tuple[str, int], float]:
    """The predicted loss increase of each (layer, bits): the measured one, made monotone — a layer at fewer bits is
    predicted to lose at least what it loses at more bits, and never less than nothing. A measured decrease, or a
    smaller loss at fewer bits than at more, is the scan's noise (one validation split), not a gain to chase.

    Example:
        >>> rows = [{"layer": "a", "bits": b, "damage": d} for b, d in [(2, -0.01), (4, 0.006), (8, 0.001)]]
        >>> layer_damage({"rows": rows})
        {('a', 8): 0.001, ('a', 4): 0.006, ('a', 2): 0.006}
    """
    out: dict[tuple[str, int], float] = {}
    worst: dict[str, float] = {}
    for row in sorted(scan["rows"], key=lambda r: -r["bits"]):
        worst[row["layer"]] = max(worst.get(row["layer"], 0.0), float(row["damage"]))
        out[row["layer"], row["bits"]] = worst[row["layer"]]
    return out


def average_bits_of(scan: dict[str, Any], layer_bits: dict[str, int]) -> float:
    """The average weight bits over the scanned layers that ``layer_bits`` gives."""
    params = {r["layer"]: r["params"] for r in scan["rows"]}
    total = sum(params.values())
    return sum(params[n] * layer_bits[layer_pattern(n)] for n in params) / total


def predicted_damage(scan: dict[str, Any], layer_bits: dict[str, int]) -> float:
    """The sum of the chosen bit-widths' predicted loss increases (:func:`layer_damage`; each layer measured alone)."""
    damage = layer_damage(scan)
    chosen = [r for r in scan["rows"] if layer_bits[layer_pattern(r["layer"])] == r["bits"]]
    return sum(damage[r["layer"], r["bits"]] for r in chosen)


def write_layer_bits(scan: dict[str, Any], layer_bits: dict[str, int], out: Path) -> dict[str, Path]:
    """Write ``quantization_sensitivity.json`` (the scan and the choice) and ``layer_bits.yaml`` into ``out``."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "quantization_sensitivity.json", "layer_bits": out / "layer_bits.yaml"}
    average, damage = average_bits_of(scan, layer_bits), predicted_damage(scan, layer_bits)
    paths["json"].write_text(json.dumps({**scan, "layer_bits": layer_bits, "average_bits": average,
                                         "predicted_damage": damage}, indent=2))  # fmt: skip
    header = (
        "# Per-layer weight bits from a quantization sensitivity scan (lightning-compress-sensitivity); use it as\n"
        f"#   lightning-compress recipe=digits_qat_int8 compression.quantization.layer_bits={paths['layer_bits']}\n"
        f"# average weight bits {average:.3f}; predicted validation-loss increase {damage:.4f}\n"
    )
    paths["layer_bits"].write_text(header + yaml.safe_dump(layer_bits, sort_keys=False))
    return paths
