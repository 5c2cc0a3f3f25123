"""The ``lightning-compress-sensitivity`` Hydra app: train (or load) the dense model, scan every layer's pruning
sensitivity on the validation split, write ``layer_sparsity.yaml`` for ``MagnitudePruning(layer_sparsity=...)`` — or,
with ``sensitivity.kind=quantization``, every layer's weight-bit sensitivity, and write ``layer_bits.yaml`` (bits per
layer under a budget) for ``QuantizationAwareTraining(layer_bits=...)``.

    lightning-compress-sensitivity                                   # digits, small CNN
    lightning-compress-sensitivity sensitivity.max_accuracy_drop=0.02 model=mlp
    lightning-compress-sensitivity -m sensitivity.max_accuracy_drop=0.005,0.01,0.02   # a multirun
    lightning-compress compression.pruning.layer_sparsity=<run dir>/layer_sparsity.yaml
    lightning-compress-sensitivity -m sensitivity.kind=quantization sensitivity.average_bits=3,4   # scanned once
    lightning-compress recipe=digits_qat_int8 compression.quantization.layer_bits=<run dir>/layer_bits.yaml

The scans themselves are :mod:`lightning_compress.analysis.sensitivity` and
:mod:`lightning_compress.analysis.mixed_precision` (usable without Hydra).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from rich import box
from rich.console import Console
from rich.table import Table

from lightning_compress.analysis.mixed_precision import (
    average_bits_of,
    bits_budget,
    check_bit_choices,
    choose_layer_bits,
    predicted_damage,
    quantization_scan,
    write_layer_bits,
)
from lightning_compress.analysis.sensitivity import (
    check_drop,
    check_sparsities,
    layer_pattern,
    layer_sparsity_from_scan,
    overall_sparsity,
    rows_by_layer,
    sensitivity_scan,
    write_scan,
)
from lightning_compress.apps.config import CONFIG_SEARCHPATH, instantiate
from lightning_compress.apps.tracking import finish_wandb_run
from lightning_compress.apps.train import build_task, job_settings, stage_cache
from lightning_compress.core.cache import StageCache
from lightning_compress.core.metrics import evaluate_accuracy, evaluate_loss_and_accuracy
from lightning_compress.core.selection import select_modules, weights_of
from lightning_compress.trainer.tables import log_table

log = logging.getLogger(__name__)


#: The settings each kind of scan depends on (the rest — tolerance, budget — only chooses from its rows).
SCAN_SETTINGS = {
    "pruning": ("kind", "sparsities", "granularity", "include", "exclude", "checkpoint"),
    "quantization": ("kind", "bits", "include", "exclude", "checkpoint"),
}


def run(cfg: Any) -> dict[str, Any]:
    """One job of ``lightning-compress-sensitivity`` on a composed config (see ``conf/sensitivity.yaml``)."""
    opts = cfg.sensitivity
    kind = opts.get("kind", "pruning")
    if kind not in SCAN_SETTINGS:
        raise ValueError(f"`sensitivity.kind` must be one of {tuple(SCAN_SETTINGS)}, got {kind!r}.")
    # refuse bad settings before training
    if kind == "quantization":
        smallest = check_bit_choices(list(opts.bits))[0]
        size = None if opts.size_kib is None else 1024 * opts.size_kib
        budget = {"average_bits": opts.average_bits, "size_bytes": size}
    else:
        levels = check_sparsities(list(opts.sparsities), opts.granularity)
        check_drop(opts.max_accuracy_drop)
    out = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module = build_task(cfg)
    selected = select_modules(module, opts.include, opts.exclude)  # refuse bad patterns before training
    if kind == "quantization":  # and a budget that the smallest bits cannot meet
        weights = weights_of(selected)
        bits_budget({"rows": [{"layer": n, "params": w.numel(), "bits": smallest} for n, w in weights.items()]},
                    **budget)  # fmt: skip
    logger = instantiate(cfg.logger) if cfg.get("logger") else None
    cache = stage_cache(cfg)
    settings = job_settings(cfg)
    scan_key = {
        **settings,
        "sensitivity": {k: v for k, v in settings["sensitivity"].items() if k in SCAN_SETTINGS[kind]},
    }
    stage = "sensitivity" if kind == "pruning" else "quantization_sensitivity"
    scan = cache.load(stage, scan_key, lambda p: dict(json.loads(p.read_text())), ".json") if cache else None
    if scan is not None:
        log.info("Reusing the scan of the same model and settings (only the tolerance or budget differs): %s",
                 cache.path(stage, scan_key, ".json") if cache else "")  # fmt: skip
    else:
        dense(cfg, module, datamodule, logger, cache, settings)
        datamodule.setup("validate")
        loader = datamodule.val_dataloader()
        if kind == "quantization":
            scan = quantization_scan(module, lambda m: evaluate_loss_and_accuracy(m, loader, "the validation loader"),
                                     list(opts.bits), opts.include, opts.exclude)  # fmt: skip
        else:
            scan = sensitivity_scan(
                module, lambda m: evaluate_accuracy(m, loader, "the validation loader"), levels, opts.granularity,
                opts.include, opts.exclude,
            )  # fmt: skip
        if cache is not None:
            cache.store(stage, scan_key, lambda p: p.write_text(json.dumps(scan)), ".json")
    if kind == "quantization":
        return report_bits(scan, budget, out, logger)
    targets = layer_sparsity_from_scan(scan, opts.max_accuracy_drop)
    paths = write_scan(scan, targets, out)

    title = f"validation accuracy (%) with one layer pruned (dense: {100 * scan['baseline']:.2f} %)"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("layer", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    for level in levels:
        table.add_column(f"{100 * level:g} %", justify="right")
    table.add_column("target", justify="right")
    for layer, rows in rows_by_layer(scan).items():
        cells = [f"{100 * r['accuracy']:.1f}" for r in rows]
        table.add_row(layer, f"{rows[0]['params']:,}", *cells, f"{100 * targets[layer_pattern(layer)]:g} %")
    Console().print(table)
    overall = overall_sparsity(scan, targets)
    print(f"Targets (overall sparsity {overall:.2%}): {paths['targets']}\n"
          f"  lightning-compress compression.pruning.layer_sparsity={paths['targets']}")  # fmt: skip
    if logger is not None:
        columns = ["layer", "params", "sparsity", "accuracy", "drop"]
        log_table([logger], "sensitivity/scan", columns, [[r[c] for c in columns] for r in scan["rows"]], out)
        logger.log_metrics({"sensitivity/baseline": scan["baseline"], "sensitivity/overall_sparsity": overall})
    return {**scan, "layer_sparsity": targets, "overall_sparsity": overall, **{k: str(v) for k, v in paths.items()}}


def report_bits(scan: dict[str, Any], budget: dict[str, Any], out: Path, logger: Any) -> dict[str, Any]:
    """Choose the bits per layer under the budget, write ``layer_bits.yaml``, print the scan and the choice."""
    layer_bits = choose_layer_bits(scan, **budget)
    paths = write_layer_bits(scan, layer_bits, out)
    average, damage = average_bits_of(scan, layer_bits), predicted_damage(scan, layer_bits)
    base = scan["baseline"]
    title = (f"validation loss with one layer's weights quantized (float: loss {base['loss']:.4f}, "
             f"accuracy {100 * base['accuracy']:.2f} %)")  # fmt: skip
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("layer", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    levels = sorted({r["bits"] for r in scan["rows"]})
    for level in levels:
        table.add_column(f"{level} bits", justify="right")
    table.add_column("chosen", justify="right")
    for layer, rows in rows_by_layer(scan, "bits").items():
        cells = [f"{r['loss']:.4f}" for r in rows]
        table.add_row(layer, f"{rows[0]['params']:,}", *cells, str(layer_bits[layer_pattern(layer)]))
    Console().print(table)
    print(f"Bits per layer (average {average:.3f} bits per weight, predicted loss increase {damage:.4f}): "
          f"{paths['layer_bits']}\n  lightning-compress recipe=digits_qat_int8 "
          f"compression.quantization.layer_bits={paths['layer_bits']}")  # fmt: skip
    if logger is not None:
        columns = ["layer", "params", "bits", "loss", "accuracy", "damage"]
        log_table([logger], "sensitivity/quantization", columns, [[r[c] for c in columns] for r in scan["rows"]], out)
        logger.log_metrics({"sensitivity/average_bits": average, "sensitivity/predicted_damage": damage})
    return {**scan, "layer_bits": layer_bits, "average_bits": average, "predicted_damage": damage,
            **{k: str(v) for k, v in paths.items()}}  # fmt: skip


def dense(cfg: Any, module: Any, datamodule: Any, logger: Any, cache: StageCache | None, settings: dict) -> None:
    """The dense model to scan: loaded from ``sensitivity.checkpoint``, or from the stage store when one with the
    same task and training settings was trained before (a multirun over the tolerance, a rerun), else trained."""
    checkpoint = cfg.sensitivity.checkpoint
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"`sensitivity.checkpoint` {checkpoint!r} does not exist.")
        module.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"])
        return
    key = {k: settings.get(k) for k in ("data", "model", "module", "trainer", "seed")}

    def load(path: Path) -> bool:
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
        return True

    if cache is not None and cache.load("dense", key, load, ".ckpt"):
        log.info("Reusing the dense model trained with the same settings: %s", cache.path("dense", key, ".ckpt"))
        return
    trainer = instantiate(cfg.trainer, logger=logger or False, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    if cache is not None:
        cache.store("dense", key, lambda p: trainer.save_checkpoint(str(p)), ".ckpt")


@hydra.main(version_base="1.3", config_path=CONFIG_SEARCHPATH, config_name="sensitivity")
def main(cfg: Any) -> float:
    """Entry point of the ``lightning-compress-sensitivity`` console script (a Hydra app)."""
    try:
        result = run(cfg)
    finally:
        finish_wandb_run()
    return float(result["overall_sparsity"] if "overall_sparsity" in result else result["predicted_damage"])


if __name__ == "__main__":
    main()
