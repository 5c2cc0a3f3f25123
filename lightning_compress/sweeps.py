"""Sweeps: the Pareto front of accuracy against compressed size, written when a Hydra multirun ends.

:func:`pareto_front` is pure; :class:`ParetoCallback` is the Hydra callback that the ``hparams_search`` configs
install: at the end of a multirun it reads every job's ``report.json`` and writes ``pareto.json`` and
``pareto.png`` into the sweep directory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lightning_compress.plots import pyplot


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


def collect_trials(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job of a sweep that wrote a report: its directory, overrides and objectives."""
    trials = []
    for report_path in sorted(
        sweep_dir.glob("*/report.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else p.parent.name
    ):
        report = json.loads(report_path.read_text())
        overrides_path = report_path.parent / ".hydra" / "overrides.yaml"
        overrides = list(OmegaConf.load(overrides_path)) if overrides_path.exists() else []
        trials.append(
            {
                "job": report_path.parent.name,
                "overrides": [str(o) for o in overrides],
                "accuracy": report["accuracy"],
                "size_bytes_compressed": report["size_bytes_compressed"],
                "compression_ratio": report.get("compression_ratio"),
                "sparsity": report.get("sparsity"),
            }
        )
    return trials


def write_pareto(sweep_dir: Path) -> dict[str, Any]:
    """Write ``pareto.json`` and ``pareto.png`` for the sweep in ``sweep_dir``; returns the JSON content."""
    trials = collect_trials(sweep_dir)
    front = pareto_front([(t["accuracy"], t["size_bytes_compressed"]) for t in trials])
    result = {
        "objectives": {"accuracy": "maximize", "size_bytes_compressed": "minimize"},
        "trials": trials,
        "front": [trials[i] for i in front],
    }
    (sweep_dir / "pareto.json").write_text(json.dumps(result, indent=2))
    if trials:
        plt = pyplot("The sweep's Pareto plot")
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        size = [t["size_bytes_compressed"] / 1024 for t in trials]
        accuracy = [100 * t["accuracy"] for t in trials]
        ax.scatter(size, accuracy, color="tab:gray", label="trials")
        ax.step([size[i] for i in front], [accuracy[i] for i in front], where="post", color="tab:red", marker="o",
                label="Pareto front")  # fmt: skip
        ax.set_xlabel("compressed size (KiB)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{len(trials)} trials, {len(front)} on the front")
        ax.legend()
        fig.tight_layout()
        fig.savefig(sweep_dir / "pareto.png")
        plt.close(fig)
    return result


def log_pareto_to_wandb(sweep_dir: Path, result: dict[str, Any], project: str | None, offline: bool = True) -> Path:
    """One W&B run named ``pareto`` in the sweep's group (the sweep directory, as every trial's run): the trials as a
    table, the accuracy-vs-size scatter, the front as a table and ``pareto.png``. Returns the run's directory."""
    import wandb

    front = {t["job"] for t in result["front"]}
    columns: list[str | int] = ["job", "accuracy", "size_kib", "compression_ratio", "sparsity", "on_front", "overrides"]
    rows = [
        [t["job"], t["accuracy"], t["size_bytes_compressed"] / 1024, t["compression_ratio"], t["sparsity"],
         t["job"] in front, " ".join(t["overrides"])]
        for t in result["trials"]
    ]  # fmt: skip
    run = wandb.init(
        project=project, group=str(sweep_dir), name="pareto", job_type="sweep", dir=str(sweep_dir),
        mode="offline" if offline else "online", config={"objectives": result["objectives"]},
    )  # fmt: skip
    try:
        trials = wandb.Table(columns=columns, data=rows)
        metrics: dict[str, Any] = {
            "sweep/trials": trials,
            "sweep/front": wandb.Table(
                columns=columns, data=[next(r for r in rows if r[0] == t["job"]) for t in result["front"]]
            ),  # fmt: skip
            "sweep/accuracy_vs_size": wandb.plot.scatter(trials, "size_kib", "accuracy", title="accuracy vs size"),
        }
        if (sweep_dir / "pareto.png").exists():
            metrics["sweep/pareto"] = wandb.Image(str(sweep_dir / "pareto.png"))
        run.log(metrics)
        run.summary["sweep/trials_on_front"] = len(front)
        return Path(run.dir).parent
    finally:
        run.finish()


class ParetoCallback(Callback):
    """Hydra callback: at the end of a multirun, write the sweep's Pareto front (``pareto.json``, ``pareto.png``)
    and, when the app logs to W&B, a ``pareto`` run in the sweep's group with the trials, the front and the plot."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        result = write_pareto(sweep_dir)
        logger = config.get("logger")
        if result["trials"] and logger and str(logger.get("_target_", "")).endswith("WandbLogger"):
            log_pareto_to_wandb(sweep_dir, result, logger.get("project"), bool(logger.get("offline", True)))
