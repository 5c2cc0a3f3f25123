"""The ``lightning-compress`` Hydra app: train with a recipe's compression callbacks, evaluate, report.

    lightning-compress                                   # default recipe: digits, 90 % pruning
    lightning-compress recipe=dense                      # the dense baseline
    lightning-compress compression.pruning.final_sparsity=0.95 logger=csv
    lightning-compress -m compression.pruning.final_sparsity=0.8,0.9,0.95

Every job writes into its Hydra run directory: ``report.json``, ``checkpoints/last.ckpt``,
``checkpoints/best-at-target.ckpt`` (the best epoch where the compression target holds), ``model.lcz`` (the
compact artifact) and, with the default logger, the offline W&B run under ``wandb/``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from lightning_compress.artifacts import compression_summary, model_report
from lightning_compress.config import CONFIG_NAME, instantiate
from lightning_compress.distillation import KnowledgeDistillation
from lightning_compress.pruning import MagnitudePruning
from lightning_compress.quantization import QuantizationAwareTraining
from lightning_compress.quantization.export import export_onnx, onnx_parity, pruned_zeros_kept
from lightning_compress.targets import CompressionTarget

log = logging.getLogger(__name__)


def _build_callbacks(cfg: DictConfig) -> tuple[list[pl.Callback], list[pl.Callback]]:
    compression = [instantiate(c) for c in (cfg.get("compression") or {}).values() if c]
    others = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    return compression, others


def _selected_layers(callbacks: list[pl.Callback]) -> list[str]:
    layers: list[str] = []
    for cb in callbacks:
        if isinstance(cb, MagnitudePruning):
            layers += [n for n in cb.selected_layers if n not in layers]
    return layers


#: The per-layer report: report.json key → column (rich table and the W&B table `report/layers`).
LAYER_COLUMNS = {
    "name": "layer", "type": "type", "params": "params", "nonzero": "non-zeros", "sparsity": "sparsity",
    "bits": "bits", "bytes": "fp32 size", "packed_bytes": "packed size",
}  # fmt: skip


def _fmt_bytes(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.2f} MiB"


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Print the compression report of :func:`train` as two rich tables: per layer, then the totals."""
    console = console or Console()
    layers = Table(title=f"compression report: {report.get('recipe', '')}", title_justify="left")
    for col in LAYER_COLUMNS.values():
        layers.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for row in report["layers"]:
        layers.add_row(
            row["name"], row["type"], f"{row['params']:,}", f"{row['nonzero']:,}", f"{row['sparsity']:.2%}",
            str(row["bits"]), _fmt_bytes(row["bytes"]), _fmt_bytes(row["packed_bytes"]),
        )  # fmt: skip
    console.print(layers)
    totals = Table(show_header=True)
    for col in ("accuracy", "sparsity", "params", "non-zeros", "fp32 size", "compressed size", "ratio"):
        totals.add_column(col, justify="right")
    totals.add_row(
        f"{report['accuracy']:.2%}", f"{report['sparsity']:.2%}", f"{report['params']:,}",
        f"{report['nonzero_params']:,}", _fmt_bytes(report["size_bytes_fp32"]),
        _fmt_bytes(report["size_bytes_compressed"]), f"{report['compression_ratio']:.1f}×",
    )  # fmt: skip
    console.print(totals)
    if "accuracy_teacher" in report:
        kd = Table(title="distillation", title_justify="left")
        for col in ("teacher", "student alone", "distilled student"):
            kd.add_column(col, justify="right")
        teacher = report["accuracy_teacher"]
        teacher_text = ", ".join(f"{a:.2%}" for a in teacher) if isinstance(teacher, list) else f"{teacher:.2%}"
        alone = report.get("accuracy_student_alone")
        kd.add_row(teacher_text, "—" if alone is None else f"{alone:.2%}", f"{report['accuracy']:.2%}")
        console.print(kd)
    if "onnx_parity" in report:
        quant = Table(title="quantization", title_justify="left")
        for col in ("float accuracy", "fake-quant accuracy", "ONNX Runtime accuracy", "top-1 agreement",
                    "max logit diff", "ONNX size"):  # fmt: skip
            quant.add_column(col, justify="right")
        parity = report["onnx_parity"]
        quant.add_row(
            f"{report['accuracy_float']:.2%}", f"{report['accuracy']:.2%}", f"{report['accuracy_onnx']:.2%}",
            f"{parity['top1_agreement']:.2%}", f"{parity['max_logit_diff']:.4f}", _fmt_bytes(report["size_bytes_onnx"]),
        )  # fmt: skip
        console.print(quant)


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"A quantization recipe ends with an ONNX export and an ONNX Runtime parity check, which need "
            f"{', '.join(missing)}: install them with `pip install 'lightning-compress[onnx]'`."
        )


@torch.no_grad()
def accuracy(module: torch.nn.Module, loader: Any) -> float:
    """Top-1 accuracy of ``module`` over ``loader`` (eval mode, no gradients; the mode is restored)."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    correct = total = 0
    for x, y in loader:
        correct += int((module(x.to(device)).argmax(1).cpu() == y).sum())
        total += len(y)
    module.train(was_training)
    return correct / total


def distillation_report(cfg: DictConfig, kd: KnowledgeDistillation, loader: Any, out: Path) -> dict[str, Any]:
    """The teachers' accuracy and, with ``distillation_baseline``, the student trained alone (same recipe, no
    teacher), so that the report shows teacher, student alone and distilled student side by side."""
    report: dict[str, Any] = {"accuracy_teacher": [accuracy(t, loader) for t in kd.teachers]}
    if len(kd.teachers) == 1:
        report["accuracy_teacher"] = report["accuracy_teacher"][0]
    if cfg.get("distillation_baseline"):
        alone = cfg.copy()
        with open_dict(alone):
            alone.compression = {k: v for k, v in cfg.compression.items() if k != "distillation"}
            alone.logger = None
            alone.callbacks = None
            alone.paths.output_dir = str(out / "student_alone")
        report["accuracy_student_alone"] = train(alone)["accuracy"]
    return report


def quantization_report(
    module: pl.LightningModule,
    qat: QuantizationAwareTraining,
    loader: Any,
    out: Path,
    masks: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Float vs quantized accuracy, the int8 ONNX file and its parity with the fake-quantized model; with pruning
    ``masks``, also the fraction of pruned weights that are integer zeros in the file (``pruned_zeros_kept``)."""
    with qat.disabled():
        accuracy_float = accuracy(module, loader)
    path = export_onnx(module, out / "model.int8.onnx", next(iter(loader))[0])
    parity = onnx_parity(module, path, loader)
    if masks:
        parity["pruned_zeros_kept"] = pruned_zeros_kept(path, masks)
    return {
        "accuracy_float": accuracy_float,
        "accuracy_onnx": parity.pop("accuracy_onnx"),
        "onnx_parity": {k: v for k, v in parity.items() if k != "accuracy_torch"},
        "onnx_path": str(path),
        "size_bytes_onnx": path.stat().st_size,
    }


def _sweep_group(logger_cfg: DictConfig) -> dict[str, Any]:
    """In a multirun, W&B runs without a group of their own are grouped by the sweep directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not str(logger_cfg.get("_target_", "")).endswith("WandbLogger") or logger_cfg.get("group") is not None:
        return {}
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    return {"group": HydraConfig.get().sweep.dir}


def _best_at_target(trainer: pl.Trainer) -> dict[str, Any]:
    """The checkpoint a ModelCheckpoint monitoring CompressionTarget's metric kept, and its score (None when no
    validation was at the target)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    keys = {cb.key for cb in trainer.callbacks if isinstance(cb, CompressionTarget)}  # type: ignore[attr-defined]
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor in keys and cb.best_model_path:
            score = float(cb.best_model_score) if cb.best_model_score is not None else float("nan")
            best = {"checkpoint": cb.best_model_path, cb.monitor: score if math.isfinite(score) else None}
            return {"best_at_target": best}
    return {}


def build_task(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """The data module and the LightningModule (model inside) that the config's data / model / module describe."""
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model, input_shape=datamodule.input_shape, num_classes=datamodule.num_classes)
    return datamodule, instantiate(cfg.module, net=net, num_classes=datamodule.num_classes)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job of the app on a composed config and return its report (also written as report.json)."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)

    # Everything that can be refused is built before training starts.
    datamodule, module = build_task(cfg)
    compression, others = _build_callbacks(cfg)
    qat = next((cb for cb in compression if isinstance(cb, QuantizationAwareTraining)), None)
    if qat is not None:
        _require_onnx()
    logger = instantiate(cfg.logger, **_sweep_group(cfg.logger)) if cfg.get("logger") else None
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[*compression, *others], logger=logger or False)
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(module, datamodule=datamodule)
    test_accuracy = float(trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"])

    report: dict[str, Any] = {"recipe": cfg.get("task_name"), "accuracy": test_accuracy}
    report.update(model_report(module, out / "model.lcz", _selected_layers(compression) or None))
    report["layers"] = [r.as_dict() for r in compression_summary(module)]
    checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
        trainer.checkpoint_callback, "best_model_path", ""
    )
    report["checkpoint"] = checkpoint or None
    report.update(_best_at_target(trainer))
    if qat is not None and trainer.is_global_zero:
        masks = {n: m for cb in compression if isinstance(cb, MagnitudePruning) for n, m in cb.masks.items()}
        report.update(quantization_report(module, qat, datamodule.test_dataloader(), out, masks))
    kd = next((cb for cb in compression if isinstance(cb, KnowledgeDistillation)), None)
    if kd is not None and trainer.is_global_zero:
        report.update(distillation_report(cfg, kd, datamodule.test_dataloader(), out))
    if trainer.is_global_zero:
        (out / "report.json").write_text(json.dumps(report, indent=2))
        flat = {**report, **{f"onnx_parity/{k}": v for k, v in report.get("onnx_parity", {}).items()}}
        for lg in trainer.loggers:
            lg.log_metrics({f"report/{k}": v for k, v in flat.items() if isinstance(v, (int, float))})
            if isinstance(lg, WandbLogger):  # the per-layer dashboard table
                lg.log_table("report/layers", columns=list(LAYER_COLUMNS.values()),
                             data=[[row[k] for k in LAYER_COLUMNS] for row in report["layers"]])  # fmt: skip
    _check_parity(report, cfg.get("onnx_parity_min_agreement"), out / "report.json")
    return report


def _check_parity(report: dict[str, Any], minimum: float | None, where: Path) -> None:
    """Fail the job when the int8 export disagrees with the fake-quantized model past ``minimum`` top-1 agreement,
    or lost any pruned zero."""
    parity = report.get("onnx_parity")
    if parity is None:
        return
    if minimum is not None and parity["top1_agreement"] < minimum:
        raise RuntimeError(
            f"ONNX Runtime and the fake-quantized model agree on {parity['top1_agreement']:.2%} of the test "
            f"predictions, below onnx_parity_min_agreement={minimum}; see {where}."
        )
    if parity.get("pruned_zeros_kept", 1.0) < 1.0:
        raise RuntimeError(
            f"Only {parity['pruned_zeros_kept']:.4%} of the pruned weights are zeros in the int8 ONNX file: the "
            f"masks did not survive quantization and export; see {where}."
        )


def finish_wandb_run() -> None:
    """Finish the W&B run a job started: one run per job, also in multiruns and when a job fails."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


OBJECTIVES = {"accuracy": 1, "accuracy_and_size": 2}


def _check_objective(objective: str) -> None:
    """The number of values the app returns must be the number of directions the sweeper optimises."""
    from hydra.core.hydra_config import HydraConfig

    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {sorted(OBJECTIVES)}, got {objective!r}.")
    if not HydraConfig.initialized():
        return
    direction = HydraConfig.get().sweeper.get("direction")
    if direction is None:
        return
    directions = 1 if isinstance(direction, str) else len(direction)
    if directions != OBJECTIVES[objective]:
        raise ValueError(
            f"The sweeper optimises {directions} objective(s) but objective={objective!r} returns "
            f"{OBJECTIVES[objective]}. For accuracy and size together use hparams_search=nsga2 (objective="
            "accuracy_and_size); for accuracy alone use hparams_search=tpe, random or cmaes (objective=accuracy)."
        )


@hydra.main(version_base="1.3", config_path="pkg://lightning_compress.conf", config_name=CONFIG_NAME)
def main(cfg: DictConfig) -> float | list[float]:
    """Entry point of the ``lightning-compress`` console script; returns the objective(s) for sweeps."""
    objective = str(cfg.get("objective", "accuracy"))
    _check_objective(objective)
    try:
        report = train(cfg)
    finally:
        finish_wandb_run()
    print_report(report)
    if objective == "accuracy_and_size":
        return [float(report["accuracy"]), float(report["size_bytes_compressed"])]
    return float(report["accuracy"])


if __name__ == "__main__":
    main()
