"""Sweeps in the app: what a job returns to the sweeper, and the Hydra callback that writes the Pareto front.

The front itself is computed in :mod:`lightning_compress.analysis.pareto` (no Hydra there); here the ``hparams_search``
configs' :class:`ParetoCallback` writes it when a multirun ends, and logs a ``pareto`` W&B run in the sweep's group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lightning_compress.analysis.pareto import selection_accuracy, write_pareto

#: What a job returns to a sweeper: objective name → number of values.
OBJECTIVES = {"accuracy": 1, "accuracy_and_size": 2, "accuracy_and_latency": 2}
#: The report key each multi-objective sweep minimises beside the validation accuracy (and its Pareto front uses).
SECOND_OBJECTIVE = {"accuracy_and_size": "size_bytes_compressed", "accuracy_and_latency": "latency_ms_batch1"}


def check_objective(objective: str, latency: Any = True) -> None:
    """``objective`` must be one the app returns (a latency objective needs the ``latency`` measurement and ONNX
    Runtime); inside a sweep, one value per direction of the sweeper."""
    import importlib.util

    from hydra.core.hydra_config import HydraConfig

    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {sorted(OBJECTIVES)}, got {objective!r}.")
    if objective == "accuracy_and_latency" and not latency:
        raise ValueError("objective=accuracy_and_latency minimises the measured latency, but latency=null turns the "
                         "measurement off: keep the `latency` settings.")  # fmt: skip
    if objective == "accuracy_and_latency" and importlib.util.find_spec("onnxruntime") is None:
        raise ValueError("objective=accuracy_and_latency measures the model in ONNX Runtime: install it with "
                         "`pip install 'lightning-compress[onnx]'`.")  # fmt: skip
    if not HydraConfig.initialized():
        return
    direction = HydraConfig.get().sweeper.get("direction")
    if direction is not None:
        check_directions(objective, [direction] if isinstance(direction, str) else list(direction))


def check_directions(objective: str, directions: list[Any]) -> None:
    """The number of values ``objective`` returns must be the number of directions the sweeper optimises.

    Raises:
        ValueError: They differ; the message names both settings and the ``hparams_search`` that fits.
    """
    if objective in OBJECTIVES and len(directions) != OBJECTIVES[objective]:
        raise ValueError(
            f"hydra.sweeper.direction has {len(directions)} direction(s) but objective={objective!r} returns "
            f"{OBJECTIVES[objective]} value(s). For accuracy and size together use hparams_search=nsga2 (objective="
            "accuracy_and_size); for accuracy alone use hparams_search=tpe, random or cmaes (objective=accuracy)."
        )


def objective_values(report: dict[str, Any], objective: str) -> float | list[float]:
    """The value(s) a job returns to the sweeper for ``objective``: validation accuracy (at the compression target,
    :func:`~lightning_compress.analysis.pareto.selection_accuracy`), never the test split's; and the size or the
    latency."""
    if objective in SECOND_OBJECTIVE:
        return [selection_accuracy(report), float(report[SECOND_OBJECTIVE[objective]])]
    return selection_accuracy(report)


def log_pareto_to_wandb(sweep_dir: Path, result: dict[str, Any], project: str | None, offline: bool = True) -> Path:
    """One W&B run named ``pareto`` in the sweep's group (the sweep directory, as every trial's run): the trials as a
    table, the accuracy-vs-size scatter, the front as a table and ``pareto.png``. Returns the run's directory."""
    import wandb

    front = {t["job"] for t in result["front"]}
    columns: list[str | int] = ["job", "val_accuracy", "size_kib", "compression_ratio", "sparsity", "on_front",
                                "overrides", "test_accuracy", "latency_ms_batch1", "flops_per_sample"]  # fmt: skip
    rows = [
        [t["job"], t["val_accuracy"], t["size_bytes_compressed"] / 1024, t["compression_ratio"], t["sparsity"],
         t["job"] in front, " ".join(t["overrides"]), t["test_accuracy"], t.get("latency_ms_batch1"),
         t.get("flops_per_sample")]
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
            "sweep/accuracy_vs_size": wandb.plot.scatter(
                trials, "size_kib", "val_accuracy", title="validation accuracy at the target vs size"
            ),
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
        result = write_pareto(sweep_dir, SECOND_OBJECTIVE.get(str(config.get("objective")), "size_bytes_compressed"))
        logger = config.get("logger")
        if result["trials"] and logger and str(logger.get("_target_", "")).endswith("WandbLogger"):
            log_pareto_to_wandb(sweep_dir, result, logger.get("project"), bool(logger.get("offline", True)))
