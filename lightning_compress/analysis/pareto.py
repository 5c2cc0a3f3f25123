"""The Pareto front of validation accuracy against compressed size (or measured latency) over a sweep's jobs.

Chosen on validation, reported on test: the front and every sweep objective use :func:`selection_accuracy` (the
validation split); each trial's test accuracy is written beside it and never compared.

:func:`pareto_front` is pure; :func:`write_pareto` reads every job's ``report.json`` and writes ``pareto.json`` and
``pareto.png`` into the sweep directory. The Hydra callback that calls it when a multirun ends is
:class:`lightning_compress.apps.sweeps.ParetoCallback`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_compress.analysis.plots import pyplot


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when maximising the first value and minimising the second.

    Example:
        >>> pareto_front([(0.9, 10), (0.95, 20), (0.85, 30), (0.95, 15)])
        [0, 3]
    """
    front = []
    for i, (acc_i, size_i) in enumerate(points):
        dominated = any(
            acc_j >= acc_i and size_j <= size_i and (acc_j > acc_i or size_j < size_i)
            for j, (acc_j, size_j) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][1])


def selection_accuracy(report: dict[str, Any]) -> float:
    """The accuracy a sweep chooses on — always from the validation split, never the test split.

    With checkpoint selection at the compression target (the app's default callbacks: ``CompressionTarget`` and a
    ModelCheckpoint on ``val/acc_at_target``) it is the best validation accuracy among the epochs where every
    compression target held; NaN when the target never held (the trial did not reach its compression, and a sampler
    records it as failed). Without that selection, the final model's validation accuracy (``val_accuracy``).

    Example:
        >>> selection_accuracy({"accuracy": 0.99, "val_accuracy": 0.9, "best_at_target": {"checkpoint": "c",
        ...                     "val/acc_at_target": 0.95}})
        0.95
        >>> selection_accuracy({"accuracy": 0.99, "val_accuracy": 0.9})
        0.9
    """
    best = report.get("best_at_target")
    if best:
        value = next((v for k, v in best.items() if k != "checkpoint"), None)
        return math.nan if value is None else float(value)
    return float(report["val_accuracy"])


def collect_trials(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job of a sweep that wrote a report: its directory, overrides, the objectives it is chosen on
    (``val_accuracy``: :func:`selection_accuracy`; ``size_bytes_compressed``) and, beside them, never chosen on, its
    ``test_accuracy``."""
    trials = []
    for report_path in sorted(
        sweep_dir.glob("*/report.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else p.parent.name
    ):
        report = json.loads(report_path.read_text())
        overrides_path = report_path.parent / ".hydra" / "overrides.yaml"
        overrides = list(yaml.safe_load(overrides_path.read_text()) or []) if overrides_path.exists() else []
        trials.append(
            {
                "job": report_path.parent.name,
                "overrides": [str(o) for o in overrides],
                "val_accuracy": selection_accuracy(report),
                "size_bytes_compressed": report["size_bytes_compressed"],
                "latency_ms_batch1": report.get("latency_ms_batch1"),
                "flops_per_sample": report.get("flops_per_sample"),
                "test_accuracy": report["accuracy"],
                "compression_ratio": report.get("compression_ratio"),
                "sparsity": report.get("sparsity"),
            }
        )
    return trials


#: The second objective's axis label and scale in pareto.png.
AXES = {"size_bytes_compressed": ("compressed size (KiB)", 1 / 1024),
        "latency_ms_batch1": ("ONNX Runtime latency, batch 1 (ms)", 1.0)}  # fmt: skip


def write_pareto(sweep_dir: Path, second: str = "size_bytes_compressed") -> dict[str, Any]:
    """Write ``pareto.json`` and ``pareto.png`` for the sweep in ``sweep_dir``: validation accuracy maximised and
    ``second`` (a key of :data:`AXES`: the compressed size, or the measured latency) minimised; returns the JSON."""
    if second not in AXES:
        raise ValueError(f"the Pareto front minimises one of {sorted(AXES)}, got {second!r}.")
    trials = collect_trials(sweep_dir)
    # NaN: never at its target; None: not measured
    ranked = [i for i, t in enumerate(trials) if math.isfinite(t["val_accuracy"]) and t[second] is not None]
    front = [ranked[i] for i in pareto_front([(trials[i]["val_accuracy"], trials[i][second]) for i in ranked])]
    result = {
        "objectives": {"val_accuracy": "maximize", second: "minimize"},
        "trials": trials,
        "front": [trials[i] for i in front],
    }
    (sweep_dir / "pareto.json").write_text(json.dumps(result, indent=2))
    if trials:
        plt = pyplot("The sweep's Pareto plot")
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        label, scale = AXES[second]
        x = [math.nan if t[second] is None else t[second] * scale for t in trials]
        accuracy = [100 * t["val_accuracy"] for t in trials]
        ax.scatter(x, accuracy, color="tab:gray", label="trials")
        ax.step([x[i] for i in front], [accuracy[i] for i in front], where="post", color="tab:red", marker="o",
                label="Pareto front")  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy at the target (%)")
        ax.set_title(f"{len(trials)} trials, {len(front)} on the front")
        ax.legend()
        fig.tight_layout()
        fig.savefig(sweep_dir / "pareto.png")
        plt.close(fig)
    return result
