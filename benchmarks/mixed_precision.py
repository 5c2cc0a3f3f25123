"""Automatic per-layer weight bits against uniform bits and against the "first and last layer at 8 bits" rule.

Digits (the small CNN) and MNIST-1D (the paper's CNN), 3 seeds. Per task and seed: a dense model is trained
(`recipe=dense` / `mnist1d_dense`), its layers are scanned on the validation split (each layer's weights alone at 2,
3, 4, 6 and 8 bits; `analysis.mixed_precision`), and bits per layer are chosen for an average of 4 and of 3 bits per
weight (`layer_bits.yaml`) — what `lightning-compress-sensitivity sensitivity.kind=quantization
sensitivity.average_bits=4` does. Then every variant trains through the app's own `train` with the task's int8 QAT
recipe (`digits_qat_int8` / `mnist1d_qat_int8`: QAT from epoch 10 of 30, 8-bit activations, layer outputs quantized,
int8 ONNX export checked): *automatic* (`layer_bits=<layer_bits.yaml>`), *uniform* (`weight_bits=4` or `3`
everywhere) and the *rule* of `digits_qat_w4` (first and last layer at 8 bits, the rest at 4 or 3; above the average,
as the rule does not count). Test accuracy in ONNX Runtime, mean ± std; a
difference is called beyond noise when Welch's t-test gives p < 0.05.

    python benchmarks/mixed_precision.py      # writes the `mixed_precision` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from _common import app_run, machine, mean_std, update_results
from mnist1d_accuracy import verdict

from lightning_compress.analysis.mixed_precision import (
    average_bits_of,
    choose_layer_bits,
    quantization_scan,
    write_layer_bits,
)
from lightning_compress.apps.config import compose, instantiate
from lightning_compress.apps.train import build_task
from lightning_compress.core.metrics import evaluate_loss_and_accuracy
from lightning_compress.core.selection import select_modules

BITS = (2, 3, 4, 6, 8)
AVERAGES = (4, 3)
VARIANTS = ("automatic", "uniform", "first/last 8")
#: task → (dense recipe, QAT recipe)
TASKS = {"digits": ("dense", "digits_qat_int8"), "MNIST-1D": ("mnist1d_dense", "mnist1d_qat_int8")}


def dense_scan(recipe: str, seed: int) -> tuple[dict, list[str]]:
    cfg = compose([f"recipe={recipe}", f"seed={seed}", "logger=none", "callbacks=none", "paths.output_dir=/tmp/unused"])
    pl.seed_everything(seed, workers=True)
    datamodule, module = build_task(cfg)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=datamodule)
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    scan = quantization_scan(module, lambda m: evaluate_loss_and_accuracy(m, loader), BITS)
    return scan, [n for n, _ in select_modules(module)]


def qat(recipe: str, seed: int, out: Path, weight_bits: int, layer_bits: Path | None) -> dict:
    overrides = [f"recipe={recipe}", f"seed={seed}", f"compression.quantization.weight_bits={weight_bits}"]
    if layer_bits is not None:
        overrides.append(f"compression.quantization.layer_bits={layer_bits}")
    return app_run(overrides, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="lc-bits-"))
    start = time.perf_counter()
    acc: dict[tuple[str, int, str], list[float]] = {}
    avg: dict[tuple[str, int, str], list[float]] = {}
    chosen_rows = []
    for seed in range(args.seeds):
        for task, (dense_recipe, qat_recipe) in TASKS.items():
            scan, layers = dense_scan(dense_recipe, seed)
            params = {r["layer"]: r["params"] for r in scan["rows"]}
            total = sum(params.values())
            for average in AVERAGES:
                auto = choose_layer_bits(scan, average_bits=average)
                tag = f"{task.replace('-', '')}-{average}-{seed}"
                auto_path = write_layer_bits(scan, auto, work / f"auto-{tag}")["layer_bits"]
                rule_path = work / f"rule-{tag}.yaml"
                rule_path.write_text(yaml.safe_dump({"@first": 8, "@last": 8}))
                ends = {layers[0], layers[-1]}
                rule_average = sum(p * (8 if n in ends else average) for n, p in params.items()) / total
                variants = {
                    "automatic": (8, auto_path, average_bits_of(scan, auto)),
                    "uniform": (average, None, float(average)),
                    "first/last 8": (average, rule_path, rule_average),
                }
                for name, (weight_bits, path, bits) in variants.items():
                    out = work / f"{name.replace('/', '-').replace(' ', '')}-{tag}"
                    report = qat(qat_recipe, seed, out, weight_bits, path)
                    acc.setdefault((task, average, name), []).append(100 * report["accuracy_onnx"])
                    avg.setdefault((task, average, name), []).append(bits)
                    accuracy = round(100 * report["accuracy_onnx"], 2)
                    print(task, seed, average, name, round(bits, 3), accuracy, flush=True)
                cells = ", ".join(f"{pattern.strip('^$').replace(chr(92), '').removeprefix('net.')}: {bits}"
                                  for pattern, bits in auto.items())  # fmt: skip
                chosen_rows.append(f"| {task} | {seed} | {average} | {cells} | {average_bits_of(scan, auto):.3f} |")
    minutes = (time.perf_counter() - start) / 60
    rows = []
    for task in TASKS:
        for average in AVERAGES:
            base = acc[(task, average, "uniform")]
            for name in VARIANTS:
                values = acc[(task, average, name)]
                bits = sum(avg[(task, average, name)]) / len(avg[(task, average, name)])
                rows.append(f"| {task} | {average} | {name} | {bits:.3f} | {mean_std(values)} | "
                            f"{'—' if name == 'uniform' else verdict(values, base)} |")  # fmt: skip
    body = f"""
## Mixed precision: automatic bits per layer vs uniform vs "first and last at 8"

`python benchmarks/mixed_precision.py` — digits (small CNN) and MNIST-1D (CNN), {args.seeds} seeds; bits chosen from a
validation scan of a dense model (each layer alone at {", ".join(map(str, BITS))} bits, least predicted loss under the
average), then QAT with the task's int8 recipe (8-bit activations); accuracy of the int8 ONNX model in ONNX Runtime
on the test split. {minutes:.0f} min. {machine()}.

| task | target average bits | variant | average weight bits | ONNX test accuracy (%) | vs uniform |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Bits chosen per seed (layer: bits):

| task | seed | target | bits per layer | average |
| --- | --- | --- | --- | --- |
{chr(10).join(chosen_rows)}
"""
    update_results("mixed_precision", body)
    print(body)


if __name__ == "__main__":
    main()
