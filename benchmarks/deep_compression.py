"""Deep compression on digits (recipe `digits_deep_compression`) over 3 seeds, and a 12-trial NSGA-II sweep.

Part 1 — for each seed, the dense baseline (recipe `dense`) and the deep-compression recipe (pruning to 90 %, then
int8 quantization-aware training with layer outputs quantized, a distilling CNN teacher throughout; int8 ONNX export
and parity check at the end), both through the app's own `train` on the composed config: test accuracy, sparsity,
weight bits, compact artifact size and ratio vs fp32, ONNX Runtime accuracy and top-1 agreement with the
fake-quantized model. Goal: ≥ 22× smaller than fp32 within 1 point of dense accuracy.

Part 2 — the README's sweep command, run as a subprocess:

    lightning-compress recipe=digits_deep_compression hparams_search=nsga2 distillation_baseline=false

(12 trials of Optuna's NSGA-II over final sparsity and learning rate, maximising accuracy and minimising the
compressed size); its pareto.json is tabled and its pareto.png copied to benchmarks/pareto_nsga2.png.

    python benchmarks/deep_compression.py     # writes the `deep_compression` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, mean_std, update_results

from lightning_compress.apps.config import compose
from lightning_compress.apps.train import train

HERE = Path(__file__).parent
SWEEP = ["recipe=digits_deep_compression", "hparams_search=nsga2", "distillation_baseline=false"]


def run(recipe: str, seed: int, out: Path) -> dict:
    cfg = compose([f"recipe={recipe}", f"seed={seed}", "logger=none", "distillation_baseline=false",
                   "trainer.enable_progress_bar=false", f"paths.output_dir={out}"])  # fmt: skip
    start = time.perf_counter()
    report = train(cfg)
    report["seconds"] = time.perf_counter() - start
    report["weight_bits"] = (cfg.compression.get("quantization") or {}).get("weight_bits", 32)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="lc-deep-"))
    dense, deep = [], []
    for seed in range(args.seeds):
        dense.append(run("dense", seed, work / f"dense{seed}"))
        deep.append(run("digits_deep_compression", seed, work / f"deep{seed}"))
        print(seed, dense[-1]["accuracy"], deep[-1]["accuracy"], deep[-1]["compression_ratio"], flush=True)

    rows = []
    for seed, (d, r) in enumerate(zip(dense, deep, strict=True)):
        rows.append(
            f"| {seed} | {100 * d['accuracy']:.2f} | {100 * r['accuracy']:.2f} | {100 * r['accuracy_onnx']:.2f} | "
            f"{100 * r['sparsity']:.2f} % | {r['weight_bits']} | {r['size_bytes_compressed'] / 1024:.1f} KiB | "
            f"{r['compression_ratio']:.1f}× | {100 * r['onnx_parity']['top1_agreement']:.2f} % | "
            f"{r['onnx_parity']['max_logit_diff']:.4f} | {r['seconds']:.0f} s |"
        )
    acc_dense = [100 * d["accuracy"] for d in dense]
    acc_deep = [100 * r["accuracy"] for r in deep]
    ratios = [r["compression_ratio"] for r in deep]
    gap = sum(acc_dense) / len(acc_dense) - sum(acc_deep) / len(acc_deep)
    worst_ratio = min(ratios)
    verdict = "met" if worst_ratio >= 22 and gap <= 1.0 else "missed"

    # Part 2: the sweep, exactly as a user types it (plus where to write).
    sweep_dir = work / "nsga2"
    cmd = [sys.executable, "-m", "lightning_compress.apps.train", *SWEEP, f"hydra.sweeper.n_trials={args.trials}",
           f"hydra.sweep.dir={sweep_dir}", "trainer.enable_progress_bar=false"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=work)
    sweep_seconds = time.perf_counter() - start
    pareto = json.loads((sweep_dir / "pareto.json").read_text())
    shutil.copy(sweep_dir / "pareto.png", HERE / "pareto_nsga2.png")
    front_jobs = {t["job"] for t in pareto["front"]}

    def params(trial: dict) -> str:
        keep = ("compression.pruning.final_sparsity", "module.lr")
        return ", ".join(o for o in trial["overrides"] if o.split("=")[0] in keep)

    trial_rows = [
        f"| {t['job']} | {params(t)} | {100 * t['val_accuracy']:.2f} | {100 * t['test_accuracy']:.2f} | "
        f"{100 * t['sparsity']:.1f} % | "
        f"{t['size_bytes_compressed'] / 1024:.1f} KiB | {t['compression_ratio']:.1f}× | "
        f"{'**yes**' if t['job'] in front_jobs else ''} |"
        for t in sorted(pareto["trials"], key=lambda t: t["size_bytes_compressed"])
    ]
    body = f"""
## Deep compression on digits (prune 90 % → int8 QAT, distilling teacher) and an NSGA-II sweep

`python benchmarks/deep_compression.py` — {machine()}.

Recipe `digits_deep_compression` (small CNN; pruning to 90 % over epochs 0–12, int8 QAT with quantized layer
outputs from epoch 15, CNN teacher width 64, T = 4, alpha = 0.5, 30 epochs) vs recipe `dense`, {args.seeds} seeds,
through the app's `train` (artifact = `model.lcz`; ONNX = int8 QDQ file run in ONNX Runtime). As in the app,
a seed sets both the data split (360 test images) and the training; dense and deep share each seed's split.

| seed | dense % | deep % | ORT % | sparsity | weight bits | artifact | vs fp32 | top-1 agree | max logit diff | time |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Dense {mean_std(acc_dense)} %, deep compression {mean_std(acc_deep)} % (gap {gap:.2f} points), ratio
{min(ratios):.1f}–{max(ratios):.1f}× vs fp32 ({dense[0]["size_bytes_fp32"] / 1024:.1f} KiB).
**Goal ≥ 22× within 1 point of dense: {verdict}** (worst ratio {worst_ratio:.1f}×, gap {gap:.2f}).

### {len(pareto["trials"])}-trial NSGA-II sweep

`lightning-compress {" ".join(SWEEP)}` ({len(pareto["trials"])} trials, population 4, seed 0; {sweep_seconds / 60:.1f}
min of wall time in all on this shared machine, each trial training its teacher). Trials sorted by size; the
Pareto front (max validation accuracy at the target, min size; test accuracy only
reported) has {len(front_jobs)} trials. Plot: [pareto_nsga2.png](pareto_nsga2.png).

| job | parameters | val accuracy % | test accuracy % | sparsity | artifact | vs fp32 | on front |
|---:|---|---:|---:|---:|---:|---:|:---:|
{chr(10).join(trial_rows)}

![NSGA-II Pareto front](pareto_nsga2.png)
"""
    update_results("deep_compression", body)
    print(body)


if __name__ == "__main__":
    main()
