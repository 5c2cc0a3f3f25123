"""Sensitivity scan: prune each layer alone at several sparsities, evaluate, and derive per-layer targets.

Layers differ in how much pruning they take: the first convolution of a small CNN holds few weights that all matter,
a wide fully connected layer holds many that do not. The scan prunes one layer at a time (by magnitude, one shot, no
fine-tuning) of a trained model, measures the validation accuracy, restores the layer, and picks for each layer the
highest scanned sparsity whose accuracy drop (and that of every lower one) stays within ``max_accuracy_drop``. The
per-layer sparsities are written as ``layer_sparsity.yaml``, which ``MagnitudePruning(layer_sparsity=...)`` takes as
a path.

In Python: :func:`sensitivity_scan` and :func:`layer_sparsity_from_scan` on any ``nn.Module`` and evaluation function
(e.g. :func:`lightning_compress.core.metrics.evaluate_accuracy` on a validation loader — never the test split). As a
command: ``lightning-compress-sensitivity`` (:mod:`lightning_compress.apps.sensitivity`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.analysis.plots import pyplot
from lightning_compress.core.checks import check_number, is_number
from lightning_compress.core.masks import compute_masks, parse_granularity
from lightning_compress.core.selection import select_modules, weights_of


def check_sparsities(sparsities: Sequence[float], granularity: str) -> list[float]:
    gran = parse_granularity(granularity)
    upper = gran.max_sparsity if gran.kind == "nm" else 1.0
    allowed = f"numbers in (0, {upper:g}]" if gran.kind == "nm" else "numbers in (0, 1)"
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Sequence) or not sparsities:
        raise ValueError(f"`sparsities` must be a non-empty list of {allowed}, got {sparsities!r}.")
    for s in sparsities:
        if not is_number(s) or s <= 0 or (s > upper if gran.kind == "nm" else s >= 1):
            raise ValueError(f"`sparsities` must be a non-empty list of {allowed}, got {list(sparsities)!r}.")
    return sorted({float(s) for s in sparsities})


def layer_pattern(name: str) -> str:
    """The ``layer_sparsity`` key that selects exactly the module ``name``.

    Example:
        >>> layer_pattern("net.features.0")
        '^net\\\\.features\\\\.0$'
    """
    return f"^{re.escape(name)}$"


@torch.no_grad()
def sensitivity_scan(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98),
    granularity: str = "unstructured",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Prune every selected layer alone at each sparsity, evaluate, restore it.

    Args:
        model: A trained model (a LightningModule or any ``nn.Module``); it is left as it was.
        evaluate: ``model -> score`` (higher is better), e.g. validation accuracy.
        sparsities: The sparsities to try per layer.
        granularity: ``"unstructured"``, ``"channel"`` or ``"N:M"``, as in MagnitudePruning.
        include, exclude: Which Conv/Linear layers to scan, as in MagnitudePruning.

    Returns:
        ``{"baseline": score, "rows": [{"layer", "params", "sparsity", "accuracy", "drop"}, ...]}``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> scan = sensitivity_scan(net, lambda m: 1.0 - float(m[0].weight.eq(0).float().mean()), [0.5])
        >>> [(r["layer"], r["sparsity"], r["accuracy"]) for r in scan["rows"]]
        [('0', 0.5, 0.5), ('2', 0.5, 1.0)]
    """
    levels = check_sparsities(sparsities, granularity)
    weights = weights_of(select_modules(model, include, exclude))
    baseline = float(evaluate(model))
    rows = []
    for name, weight in weights.items():
        original = weight.detach().clone()
        for level in levels:
            try:
                # This layer's weight alone (channel: its own filter rows), so that restoring it undoes the step.
                weight.mul_(compute_masks({name: weight}, level, granularity=granularity, scope="layer")[name])
                score = float(evaluate(model))
            finally:
                weight.copy_(original)
            rows.append({"layer": name, "params": weight.numel(), "sparsity": level, "accuracy": score,
                         "drop": baseline - score})  # fmt: skip
    return {"baseline": baseline, "rows": rows}


def check_drop(max_accuracy_drop: float) -> float:
    """The tolerated accuracy drop: a number in [0, 1)."""
    return float(check_number("max_accuracy_drop", max_accuracy_drop, 0, 1, high_open=True, what="a number in [0, 1)"))


def rows_by_layer(scan: dict[str, Any], level: str = "sparsity") -> dict[str, list[dict[str, Any]]]:
    """The scan's rows per layer (in scan order), each layer's by ascending ``level`` (``"sparsity"``, or ``"bits"``
    for a quantization scan)."""
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(scan["rows"], key=lambda r: r[level]):
        by_layer.setdefault(row["layer"], []).append(row)
    return by_layer


def layer_sparsity_from_scan(scan: dict[str, Any], max_accuracy_drop: float) -> dict[str, float]:
    """Per layer, the highest scanned sparsity whose drop, and every lower one's, is at most ``max_accuracy_drop``
    (0.0 — the layer stays dense — when even the lowest drops more). Keys are ``layer_sparsity`` patterns.

    Example:
        >>> scan = {"baseline": 0.9, "rows": [
        ...     {"layer": "a", "sparsity": 0.5, "drop": 0.0}, {"layer": "a", "sparsity": 0.9, "drop": 0.001},
        ...     {"layer": "b", "sparsity": 0.5, "drop": 0.05}, {"layer": "b", "sparsity": 0.9, "drop": 0.2}]}
        >>> layer_sparsity_from_scan(scan, 0.01)
        {'^a$': 0.9, '^b$': 0.0}
    """
    check_drop(max_accuracy_drop)
    targets: dict[str, float] = {}
    for layer, rows in rows_by_layer(scan).items():
        best = 0.0
        for row in rows:  # ascending sparsity; stop at the first that drops too much
            if row["drop"] > max_accuracy_drop + 1e-12:
                break
            best = row["sparsity"]
        targets[layer_pattern(layer)] = best
    return targets


def overall_sparsity(scan: dict[str, Any], targets: dict[str, float]) -> float:
    """The sparsity over all scanned layers that the per-layer sparsities ``targets`` give (weighted by
    parameters)."""
    params = {r["layer"]: r["params"] for r in scan["rows"]}
    total = sum(params.values())
    return sum(params[n] * targets[layer_pattern(n)] for n in params) / total if total else 0.0


def write_scan(scan: dict[str, Any], targets: dict[str, float], out: Path) -> dict[str, Path]:
    """Write ``sensitivity.json``, ``layer_sparsity.yaml`` (the targets) and ``sensitivity.png`` into ``out``."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "sensitivity.json", "targets": out / "layer_sparsity.yaml", "plot": out / "sensitivity.png"}
    result = {**scan, "layer_sparsity": targets, "overall_sparsity": overall_sparsity(scan, targets)}
    paths["json"].write_text(json.dumps(result, indent=2))
    header = (
        "# Per-layer final sparsity from a sensitivity scan (lightning-compress-sensitivity); use it as\n"
        f"#   lightning-compress compression.pruning.layer_sparsity={paths['targets']}\n"
        f"# overall sparsity of the scanned layers with these targets: {result['overall_sparsity']:.4f}\n"
    )
    paths["targets"].write_text(header + yaml.safe_dump(targets, sort_keys=False))
    plt = pyplot("The sensitivity plot")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for layer, rows in rows_by_layer(scan).items():
        ax.plot([100 * r["sparsity"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", label=layer)
    ax.axhline(100 * scan["baseline"], color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("sparsity of the layer alone (%)")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["plot"])
    plt.close(fig)
    return paths
