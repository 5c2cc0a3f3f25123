"""The ``lightning-compress`` Hydra app: train with a recipe's compression callbacks, evaluate, report.

    lightning-compress                                   # default recipe: digits, 90 % pruning
    lightning-compress recipe=dense                      # the dense baseline
    lightning-compress compression.pruning.final_sparsity=0.95 logger=csv
    lightning-compress -m compression.pruning.final_sparsity=0.8,0.9,0.95

Every job writes into its Hydra run directory: ``report.json``, ``checkpoints/last.ckpt``,
``checkpoints/best-at-target.ckpt`` (the best epoch where the compression target holds), ``model.lcz`` (the
compact artifact, proven to restore into the model: ``load_compressed(path, model)``), ``model.deploy.lcz`` (its
smallest, deploy form, whose size the report counts) and, with the default logger, the offline W&B run under ``wandb/``.

A job is a sequence of stages, each a function below: :func:`build` (everything that can be refused, before
training) → ``fit`` and ``test`` → :func:`size_report` → :func:`quantization_report` (when a technique quantizes)
→ :func:`latency_report` (ONNX Runtime speed of the int8 file or of the float model, ``model.onnx``)
→ :func:`distillation_report` (when a technique distils; with ``distillation_baseline`` it also trains the student
alone, said in the log) → :func:`write_report`. In a multirun (``paths.stages_dir``) a job whose settings already
ran returns the stored report instead (:func:`reused_report`). The stages ask the callbacks what they can do (the
protocols of :mod:`lightning_compress.core.protocol`), never which class they are.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_compress.analysis.report import compression_summary, flops_per_sample, model_report
from lightning_compress.apps.config import CONFIG_NAME, instantiate
from lightning_compress.apps.study import register_sweeper
from lightning_compress.apps.sweeps import check_objective, objective_values
from lightning_compress.apps.terminal import LAYER_COLUMNS, print_report
from lightning_compress.apps.tracking import finish_wandb_run, sweep_group
from lightning_compress.core.cache import StageCache
from lightning_compress.core.metrics import evaluate_accuracy
from lightning_compress.core.protocol import (
    Factorizes,
    HasFloatMode,
    HasMasks,
    HasTeachers,
    RemovesChannels,
    Restorable,
)
from lightning_compress.export.onnx import export_float_onnx, export_onnx, onnx_parity, pruned_zeros_kept
from lightning_compress.quantization.prepare import unprepare
from lightning_compress.trainer.checkpoint_selection import CompressionTarget
from lightning_compress.trainer.progress import spawned
from lightning_compress.trainer.tables import log_table

log = logging.getLogger(__name__)


@dataclass
class Job:
    """What :func:`build` makes of a config: the task, the callbacks and the Trainer."""

    cfg: DictConfig
    out: Path
    datamodule: pl.LightningDataModule
    module: pl.LightningModule
    compression: list[pl.Callback]
    trainer: pl.Trainer


def build_task(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """The data module and the LightningModule (model inside) that the config's data / model / module describe."""
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model, input_shape=datamodule.input_shape, num_classes=datamodule.num_classes)
    return datamodule, instantiate(cfg.module, net=net, num_classes=datamodule.num_classes)


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"A quantization recipe ends with an ONNX export and an ONNX Runtime parity check, which need "
            f"{', '.join(missing)}: install them with `pip install 'lightning-compress[onnx]'`."
        )


def build(cfg: DictConfig) -> Job:
    """Stage 1: everything that can be refused is built before training starts (task, callbacks, logger,
    Trainer); a quantizing recipe also needs the ONNX packages for its export."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module = build_task(cfg)
    compression = [instantiate(c) for c in (cfg.get("compression") or {}).values() if c]
    others = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if any(isinstance(cb, HasFloatMode) for cb in compression):
        _require_onnx()
    logger = instantiate(cfg.logger, **sweep_group(cfg.logger)) if cfg.get("logger") else None
    if type(logger).__name__ == "WandbLogger":
        # Lightning passes anonymous=None to wandb.init, which W&B >= 0.19 answers with "The anonymous setting has no
        # effect and will be removed": a warning the user can do nothing about, on every run.
        logger._wandb_init.pop("anonymous", None)  # type: ignore[union-attr]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[*compression, *others], logger=logger or False)
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return Job(cfg, out, datamodule, module, compression, trainer)


def target_report(job: Job) -> dict[str, Any]:
    """Whether every technique reached its target during training (``at_target``) and, for those a stop (EarlyStopping,
    ``max_time``, ``max_steps``) left short, what each had reached then and whether ``finish_on_stop`` applied the
    target at the end of fit (``stopped_short``)."""
    short = [s for cb in job.compression if (s := getattr(cb, "stopped_short", None))]
    return {"at_target": not short, "stopped_short": short}


def pruning_masks(job: Job) -> dict[str, Any]:
    """Layer name → keep-mask of every technique on the job that holds masks (:class:`HasMasks`)."""
    return {n: m for cb in job.compression if isinstance(cb, HasMasks) for n, m in cb.masks.items()}


def size_report(job: Job) -> dict[str, Any]:
    """Stage 3: sizes (the compact artifact ``model.lcz`` is written and measured), floating-point operations per
    sample, per-layer rows, checkpoints."""
    job.datamodule.setup("validate")
    example = next(iter(job.datamodule.val_dataloader()))[0].to(job.module.device)
    selected = list(pruning_masks(job)) or None
    report: dict[str, Any] = dict(model_report(job.module, job.out / "model.lcz", selected, example))
    report["flops_per_sample"] = flops_per_sample(job.module, example)
    report["layers"] = [r.as_dict() for r in compression_summary(job.module)]
    report["checkpoint"] = checkpoint_path(job.trainer) or None
    report.update(_best_at_target(job.trainer))
    return report


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


def quantization_report(job: Job, quantizer: HasFloatMode, loader: Any) -> dict[str, Any]:
    """Stage 4: float vs quantized accuracy, the int8 ONNX file and its parity with the fake-quantized model; with
    masks on the Trainer, also the fraction of pruned weights that are integer zeros in the file
    (``pruned_zeros_kept``)."""
    with quantizer.disabled():
        accuracy_float = evaluate_accuracy(job.module, loader, "the test loader")
    path = export_onnx(job.module, job.out / "model.int8.onnx", next(iter(loader))[0])
    parity = onnx_parity(job.module, path, loader)
    if masks := pruning_masks(job):
        parity["pruned_zeros_kept"] = pruned_zeros_kept(path, masks)
    return {
        "accuracy_float": accuracy_float,
        "accuracy_onnx": parity.pop("accuracy_onnx"),
        "onnx_parity": {k: v for k, v in parity.items() if k != "accuracy_torch"},
        "onnx_path": str(path),
        "size_bytes_onnx": path.stat().st_size,
    }


def latency_report(job: Job, report: dict[str, Any], example: Any) -> dict[str, Any]:
    """Stage 4b: ONNX Runtime latency of the job's model (``latency`` settings): the int8 file when the job
    quantized, else the float model exported to ``model.onnx`` (checked in ONNX Runtime before it is written)."""
    settings = job.cfg.get("latency")
    if not settings:
        return {}
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None:
        log.warning("latency not measured: it needs ONNX Runtime (`pip install 'lightning-compress[onnx]'`); "
                    "set latency=null to skip it without this warning.")  # fmt: skip
        return {"latency_ms_batch1": None, "throughput_per_s": None}
    if "onnx_path" not in report:
        path = export_float_onnx(job.module, job.out / "model.onnx", example)
        return {**_latency(job, path, example), "latency_onnx": path.name}
    # The int8 file, and the float model with the same trained weights as the yardstick of its speed-up.
    path = Path(report["onnx_path"])
    measured = {**_latency(job, path, example), "latency_onnx": path.name}
    float_model = copy.deepcopy(job.module)
    unprepare(float_model)
    float_path = export_float_onnx(float_model, job.out / "model.float.onnx", example)
    baseline = _latency(job, float_path, example)
    measured["float_throughput_per_s"] = baseline["throughput_per_s"]
    measured["float_latency_ms_batch1"] = baseline["latency_ms_batch1"]
    return measured


def _latency(job: Job, path: Path, example: Any) -> dict[str, Any]:
    """ONNX Runtime latency of the file ``path`` with the job's ``latency`` settings ({} when they are null)."""
    if not (settings := job.cfg.get("latency")):
        return {}
    from lightning_compress.analysis.latency import onnx_latency

    return onnx_latency(path, example, **dict(settings))


def compact_report(job: Job, loader: Any) -> dict[str, Any]:
    """Stage 4c, with channel groups removed (:class:`RemovesChannels`) or layers kept at low rank
    (:class:`Factorizes`): the compact network (:func:`~lightning_compress.export_compact`) written as
    ``model.compact.pt`` and ``model.compact.onnx`` (``model.compact.int8.onnx``, with its ONNX Runtime parity, when
    the job quantizes) after checking on the whole test split that it computes what the
    trained model computes (largest absolute output difference at most 1e-4, else the job fails), with its parameters,
    FLOPs and ONNX Runtime latency."""
    channels = any(isinstance(cb, RemovesChannels) and cb.groups for cb in job.compression)
    ranks = {n: r for cb in job.compression if isinstance(cb, Factorizes) for n, r in cb.ranks.items()}
    quantizes = any(isinstance(cb, HasFloatMode) for cb in job.compression)
    if ranks and quantizes:
        log.warning("The low-rank layers stay whole in the compact network: their two factors would have no "
                    "quantizers (export_compact refuses ranks on a quantization-aware model); model.int8.onnx holds "
                    "them at full shape.")  # fmt: skip
        ranks = {}
    if not channels and not ranks:
        return {}
    import torch

    from lightning_compress.export.compact import export_compact

    example = next(iter(loader))[0].to(job.module.device)
    compact = export_compact(
        job.module, example, check_inputs=(batch[0] for batch in loader), ranks=ranks, channels=channels
    )
    torch.save(compact, job.out / "model.compact.pt")
    parity = {}
    if quantizes:
        # quantization-aware: the compact network keeps its layers' quantizers (cut with the channels); int8 QDQ
        path = export_onnx(compact, job.out / "model.compact.int8.onnx", example)
        parity = {"onnx_parity": {k: v for k, v in onnx_parity(compact, path, loader).items() if k != "accuracy_torch"}}
    else:
        path = export_float_onnx(compact, job.out / "model.compact.onnx", example)
    measured = _latency(job, path, example)
    return {
        "compact": {
            "params": sum(p.numel() for p in compact.parameters()),
            "flops_per_sample": flops_per_sample(compact, example[:1]),
            "max_abs_difference": compact.max_abs_difference,
            **({"quantized_top1_agreement": compact.quantized_top1_agreement} if quantizes else {}),
            "onnx_path": path.name,
            "size_bytes_onnx": path.stat().st_size,
            **parity,
            **{k: v for k, v in measured.items() if k in ("latency_ms_batch1", "throughput_per_s")},
        }
    }


def train_student_alone(cfg: DictConfig, out: Path) -> float:
    """The distillation baseline: the same job without the distillation callback (no logger), its test accuracy."""
    alone = cfg.copy()
    with open_dict(alone):
        alone.compression = {k: v for k, v in cfg.compression.items() if k != "distillation"}
        alone.logger = None
        alone.callbacks = None
        alone.paths.output_dir = str(out)
    log.info("distillation_baseline=true: training the student alone (the same recipe without the teacher) in %s", out)
    return float(train(alone)["accuracy"])


def distillation_report(job: Job, distiller: HasTeachers, loader: Any) -> dict[str, Any]:
    """Stage 5: the teachers' accuracy and, with ``distillation_baseline``, the student trained alone (same recipe,
    no teacher), so that the report shows teacher, student alone and distilled student side by side."""
    accuracies = [evaluate_accuracy(t, loader, "the test loader") for t in distiller.teachers]
    report: dict[str, Any] = {"accuracy_teacher": accuracies[0] if len(accuracies) == 1 else accuracies}
    if job.cfg.get("distillation_baseline"):
        report["accuracy_student_alone"] = train_student_alone(job.cfg, job.out / "student_alone")
    return report


def write_report(job: Job, report: dict[str, Any]) -> None:
    """Stage 6: ``report.json``, its numbers to every logger (``report/...``), the per-layer table."""
    (job.out / "report.json").write_text(json.dumps(report, indent=2))
    compact = report.get("compact", {})
    flat = {**report, **{f"onnx_parity/{k}": v for k, v in report.get("onnx_parity", {}).items()},
            **{f"compact/{k}": v for k, v in compact.items()},
            **{f"compact/onnx_parity/{k}": v for k, v in compact.get("onnx_parity", {}).items()}}  # fmt: skip
    rows = [[row[k] for k in LAYER_COLUMNS] for row in report["layers"]]
    for lg in job.trainer.loggers:
        lg.log_metrics({f"report/{k}": v for k, v in flat.items() if isinstance(v, (int, float))})
    log_table(job.trainer.loggers, "report/layers", list(LAYER_COLUMNS.values()), rows, job.out)


def recover_after_spawn(job: Job) -> None:
    """Under a spawning strategy (``trainer=ddp`` is ``ddp_spawn``) Lightning copies only the weights back to this
    process: every compression callback rebuilds its state here (masks, quantizers, phase) from the checkpoint the
    run wrote, so that testing, the export and the report see the compressed model, as on one process."""
    path = checkpoint_path(job.trainer)  # after a spawn only best_model_path comes back: the `last` checkpoint here
    restorable = [cb for cb in job.compression if isinstance(cb, Restorable)]
    if restorable and not path:
        raise RuntimeError(
            f"strategy {type(job.trainer.strategy).__name__} ran the training in other processes and no checkpoint "
            "came back to rebuild the compression state from; keep the default `callbacks` (checkpoints/last.ckpt)."
        )
    for cb in restorable:
        cb.restore(job.trainer, job.module, path)
    for logger in job.trainer.loggers:
        _continue_csv_file(logger)


def checkpoint_path(trainer: pl.Trainer) -> str:
    """The checkpoint the job's first ModelCheckpoint wrote last (``checkpoints/last.ckpt`` by default), or ``""``."""
    callback = trainer.checkpoint_callback
    return getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "") or ""


def _continue_csv_file(logger: Any) -> None:
    """A CSVLogger whose file the spawned processes wrote learns the columns already in it (Lightning's writer keeps
    them in memory only, so the next write from this process would rewrite the file with its own columns and fail)."""
    if isinstance(logger, CSVLogger):
        path = Path(logger.experiment.metrics_file_path)
        if path.is_file() and path.stat().st_size:
            header = path.read_text().splitlines()[0].split(",")
            keys = logger.experiment.metrics_keys
            keys.extend(k for k in header if k not in keys)
            keys.sort()


def tester(job: Job) -> pl.Trainer:
    """The Trainer that tests: the job's own, or after a spawning strategy one process in this one — the compressed
    model is here now, and one device sees every test sample once (a DistributedSampler pads with repeats)."""
    if not spawned(job.trainer):
        return job.trainer
    return pl.Trainer(
        accelerator=job.trainer.accelerator, devices=1, logger=job.trainer.loggers or False, callbacks=[],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=job.trainer.default_root_dir,
    )  # fmt: skip


def job_settings(cfg: DictConfig) -> dict[str, Any]:
    """What decides a job's result: the resolved config without where it writes (``paths``: a path derived from the
    run directory reads as ``<paths.output_dir>``), its loggers and the objective the sweeper reads."""
    keyed = cfg.copy()
    with open_dict(keyed):
        keyed.paths = {k: f"<paths.{k}>" for k in cfg.paths}
        for key in ("logger", "objective"):
            keyed.pop(key, None)
    return OmegaConf.to_container(keyed, resolve=True)  # type: ignore[return-value]


def stage_cache(cfg: DictConfig) -> StageCache | None:
    """The store of reusable stages (``paths.stages_dir``; a multirun's ``<sweep dir>/stages``), or None."""
    root = (cfg.get("paths") or {}).get("stages_dir")
    return StageCache(root) if root else None


def reused_report(cfg: DictConfig, cache: StageCache, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The report of a finished job with the same ``settings`` (:func:`job_settings`), written into this job's
    directory with ``reused_from`` naming the stored file; None when there is none (or it was corrupt: warned)."""
    if cfg.get("ckpt_path"):
        return None  # resuming a job is asked for explicitly: run it
    report = cache.load("job", settings, lambda p: dict(json.loads(p.read_text())), ".json")
    if report is None:
        return None
    report["reused_from"] = str(cache.path("job", settings, ".json"))
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log.info("A job with the same settings already ran: its report is reused (%s); nothing is trained.",
             report["reused_from"])  # fmt: skip
    return report


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job of the app on a composed config and return its report (also written as report.json).

    With ``paths.stages_dir`` (a multirun's ``<sweep dir>/stages``) a job whose settings already ran returns that
    report without training (:func:`reused_report`), and a finished job stores its report there."""
    cache = stage_cache(cfg)
    settings = job_settings(cfg) if cache is not None else {}
    if cache is not None and (reused := reused_report(cfg, cache, settings)) is not None:
        return reused
    job = build(cfg)
    try:
        job.trainer.fit(job.module, datamodule=job.datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException:
        # Lightning stops at the next step and raises SystemExit(None), which would exit with status 0 — a scheduler
        # would take the stopped job for a finished one. Exit 143 (128 + SIGTERM) and say how to continue.
        last = checkpoint_path(job.trainer)
        log.error(
            "Stopped by SIGTERM at epoch %d, step %d; no report was written. Resume with ckpt_path=%s",
            job.trainer.current_epoch, job.trainer.global_step, last or "<a checkpoint of this run>",
        )  # fmt: skip
        raise SystemExit(143) from None
    if spawned(job.trainer):
        recover_after_spawn(job)
    test_accuracy = float(tester(job).test(job.module, datamodule=job.datamodule, verbose=False)[0]["test/acc"])
    job.datamodule.setup("validate")
    val_accuracy = evaluate_accuracy(job.module, job.datamodule.val_dataloader(), "the validation loader")
    report: dict[str, Any] = {
        "recipe": cfg.get("task_name"), "accuracy": test_accuracy, "val_accuracy": val_accuracy,
        **target_report(job), **size_report(job),
    }  # fmt: skip
    if job.trainer.is_global_zero:
        loader = job.datamodule.test_dataloader()
        quantizer = next((cb for cb in job.compression if isinstance(cb, HasFloatMode)), None)
        if quantizer is not None:
            report.update(quantization_report(job, quantizer, loader))
        report.update(latency_report(job, report, next(iter(loader))[0]))
        report.update(compact_report(job, loader))
        distiller = next((cb for cb in job.compression if isinstance(cb, HasTeachers)), None)
        if distiller is not None:
            report.update(distillation_report(job, distiller, loader))
        write_report(job, report)
    _check_parity(report, cfg.get("onnx_parity_min_agreement"), job.out / "report.json")
    if cache is not None and job.trainer.is_global_zero and not cfg.get("ckpt_path"):
        cache.store("job", settings, lambda p: p.write_text(json.dumps(report, indent=2)), ".json")
    return report


def _check_parity(report: dict[str, Any], minimum: float | None, where: Path) -> None:
    """Fail the job when the int8 export disagrees with the fake-quantized model past ``minimum`` top-1 agreement,
    or lost any pruned zero."""
    for parity, what in ((report.get("onnx_parity"), "int8 export"),
                         (report.get("compact", {}).get("onnx_parity"), "compact int8 export")):  # fmt: skip
        if parity is None:
            continue
        if minimum is not None and parity["top1_agreement"] < minimum:
            raise RuntimeError(
                f"ONNX Runtime ({what}) and the fake-quantized model agree on {parity['top1_agreement']:.2%} of the "
                f"test predictions, below onnx_parity_min_agreement={minimum}; see {where}."
            )
        if parity.get("pruned_zeros_kept", 1.0) < 1.0:
            raise RuntimeError(
                f"Only {parity['pruned_zeros_kept']:.4%} of the pruned weights are zeros in the int8 ONNX file: the "
                f"masks did not survive quantization and export; see {where}."
            )


register_sweeper()


@hydra.main(version_base="1.3", config_path="pkg://lightning_compress.conf", config_name=CONFIG_NAME)
def main(cfg: DictConfig) -> float | list[float]:
    """Entry point of the ``lightning-compress`` console script; returns the objective(s) for sweeps."""
    # torch 2.13 deprecates pytree's LeafSpec, which Lightning and torch.export still use internally: a FutureWarning
    # on every run that no setting of the user's changes.
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    # The ONNX exporter's own chatter (a line per graph pass; "torchvision is not installed" for its operators, which
    # no model here uses) is not the job's to show.
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    logging.getLogger("onnxscript").setLevel(logging.WARNING)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    objective = str(cfg.get("objective", "accuracy"))
    check_objective(objective, cfg.get("latency"))
    try:
        report = train(cfg)
    finally:
        finish_wandb_run()
    print_report(report)
    return objective_values(report, objective)


if __name__ == "__main__":
    main()
