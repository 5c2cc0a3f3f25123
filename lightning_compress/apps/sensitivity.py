"""The ``lightning-compress-sensitivity`` Hydra app: train (or load) the dense model, scan every layer's pruning
sensitivity on the validation split, write ``layer_sparsity.yaml`` for ``MagnitudePruning(layer_sparsity=...)``.

    lightning-compress-sensitivity                                   # digits, small CNN
    lightning-compress-sensitivity sensitivity.max_accuracy_drop=0.02 model=mlp
    lightning-compress-sensitivity -m sensitivity.max_accuracy_drop=0.005,0.01,0.02   # a multirun
    lightning-compress compression.pruning.layer_sparsity=<run dir>/layer_sparsity.yaml

The scan itself is :mod:`lightning_compress.analysis.sensitivity` (usable without Hydra).
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
from lightning_compress.core.metrics import evaluate_accuracy
from lightning_compress.core.selection import select_modules
from lightning_compress.trainer.tables import log_table

log = logging.getLogger(__name__)


def run(cfg: Any) -> dict[str, Any]:
    """One job of ``lightning-compress-sensitivity`` on a composed config (see ``conf/sensitivity.yaml``)."""
    opts = cfg.sensitivity
    levels = check_sparsities(list(opts.sparsities), opts.granularity)
    check_drop(opts.max_accuracy_drop)  # refuse a bad tolerance before training
    out = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module = build_task(cfg)
    select_modules(module, opts.include, opts.exclude)  # refuse bad patterns before training
    logger = instantiate(cfg.logger) if cfg.get("logger") else None
    cache = stage_cache(cfg)
    settings = job_settings(cfg)
    scan_key = {
        **settings,
        "sensitivity": {k: v for k, v in settings["sensitivity"].items() if k != "max_accuracy_drop"},
    }
    scan = cache.load("sensitivity", scan_key, lambda p: dict(json.loads(p.read_text())), ".json") if cache else None
    if scan is not None:
        log.info("Reusing the scan of the same model and settings (only the tolerance differs): %s",
                 cache.path("sensitivity", scan_key, ".json") if cache else "")  # fmt: skip
    else:
        dense(cfg, module, datamodule, logger, cache, settings)
        datamodule.setup("validate")
        loader = datamodule.val_dataloader()
        scan = sensitivity_scan(
            module, lambda m: evaluate_accuracy(m, loader, "the validation loader"), levels, opts.granularity,
            opts.include, opts.exclude,
        )  # fmt: skip
        if cache is not None:
            cache.store("sensitivity", scan_key, lambda p: p.write_text(json.dumps(scan)), ".json")
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
    return float(result["overall_sparsity"])


if __name__ == "__main__":
    main()
