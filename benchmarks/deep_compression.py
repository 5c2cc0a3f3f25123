"""Deep compression on digits (recipe `digits_deep_compression`) over 3 seeds, and a 12-trial NSGA-II sweep.

Part 1 — for each seed, the dense baseline (recipe `dense`) and the deep-compression recipe (pruning to 90 %, then
int8 quantization-aware training with layer outputs quantized, a distilling CNN teacher throughout; int8 ONNX export
and parity check at the end), both through the app's own `train` on the composed config: test accuracy, sparsity,
weight bits, compact artifact size and ratio vs fp32, ONNX Runtime accuracy and top-1 agreement with the
fake-quantized model. Goal: ≥ 22× smaller than fp32 within 1 point of dense accuracy.

Part 2 — the README's sweep command, run as a subprocess:

    lightning-compress recipe=digits_deep_compression hparams_search=nsga2 distillation_baseline=false

(12 trials of Optuna's NSGA-II over final sparsity and learning rate, maximising the validation accuracy at the
target and minimising the compressed size): once without stage reuse (``paths.stages_dir=null``), once with it,
stopped by SIGTERM after half of the trials and continued by the same command; wall times, the resumed counts and
how often the teacher was trained are reported; the resumed sweep's pareto.json is tabled and its pareto.png copied
to benchmarks/pareto_nsga2.png.

    python benchmarks/deep_compression.py     # writes the `deep_compression` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import app_run, machine, mean_std, update_results

from lightning_compress.apps.config import compose

HERE = Path(__file__).parent
SWEEP = ["recipe=digits_deep_compression", "hparams_search=nsga2", "distillation_baseline=false"]
SMOKE = ["hparams_search=nsga2", "trainer.max_epochs=1", "compression.pruning.end_epoch=1", "logger=none"]


def run(recipe: str, seed: int, out: Path) -> dict:
    report = app_run([f"recipe={recipe}", f"seed={seed}"], out)
    quantization = compose([f"recipe={recipe}", "paths.output_dir=/tmp/unused"]).compression.get("quantization")
    report["weight_bits"] = (quantization or {}).get("weight_bits", 32)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--smoke", action="store_true", help="1-epoch trials, no part 1, nothing written: a check")
    args = parser.parse_args()
    sweep_args = SMOKE if args.smoke else SWEEP
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="lc-deep-"))
    dense, deep = [], []
    for seed in range(0 if args.smoke else args.seeds):
        dense.append(run("dense", seed, work / f"dense{seed}"))
        deep.append(run("digits_deep_compression", seed, work / f"deep{seed}"))
        print(seed, dense[-1]["accuracy"], deep[-1]["accuracy"], deep[-1]["compression_ratio"], flush=True)

    # Part 2: the sweep, exactly as a user types it (plus where to write): once without stage reuse (every trial
    # trains its teacher: the sweep as it was), once with it (the default), stopped after half of its trials and
    # continued by the same command.
    plain_dir, sweep_dir = work / "nsga2-no-reuse", work / "nsga2"
    base = [sys.executable, "-m", "lightning_compress.apps.train", *sweep_args, f"hydra.sweeper.n_trials={args.trials}",
            "trainer.enable_progress_bar=false"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run([*base, f"hydra.sweep.dir={plain_dir}", "paths.stages_dir=null"], check=True, cwd=work)
    plain_seconds = time.perf_counter() - start
    cmd = [*base, f"hydra.sweep.dir={sweep_dir}"]
    stop_after = args.trials // 2
    start = time.perf_counter()
    with open(work / "first.log", "w") as log:  # a file, not a pipe: a full pipe would block the sweep
        first = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, text=True)
        while first.poll() is None and len(list(sweep_dir.glob("*/report.json"))) < stop_after:
            time.sleep(1)
        first.send_signal(signal.SIGTERM)  # as a scheduler stops a job
        first.wait()
    first_log = (work / "first.log").read_text()
    first_seconds = time.perf_counter() - start
    start = time.perf_counter()
    second = subprocess.run(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=True)
    second_seconds = time.perf_counter() - start
    logs = first_log + second.stdout
    resumed = re.search(r"(\d+) of (\d+) trials finished, (\d+) to run \(jobs from #(\d+)\)", second.stdout)
    assert resumed, second.stdout[-3000:]
    finished_before, _, ran_after, first_new_job = (int(g) for g in resumed.groups())
    teachers_trained = len(re.findall("Teacher stored for reuse", logs))
    teachers_reused = len(re.findall("Reusing the teacher", logs))
    jobs_reused = len(re.findall("A job with the same settings already ran", logs))
    sweep_seconds = first_seconds + second_seconds
    print(f"without reuse {plain_seconds:.0f} s; stopped after {first_seconds:.0f} s, resumed: {finished_before} "
          f"finished, {ran_after} run from #{first_new_job} in {second_seconds:.0f} s; teacher trained "
          f"{teachers_trained}, loaded {teachers_reused}; jobs reused {jobs_reused}", flush=True)  # fmt: skip
    if args.smoke:
        return
    pareto = json.loads((sweep_dir / "pareto.json").read_text())
    shutil.copy(sweep_dir / "pareto.png", HERE / "pareto_nsga2.png")
    front_jobs = {t["job"] for t in pareto["front"]}
    plain_front = json.loads((plain_dir / "pareto.json").read_text())["front"]

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

### {len(pareto["trials"])}-trial NSGA-II sweep, stopped and resumed, with stages reused

`lightning-compress {" ".join(SWEEP)} hydra.sweeper.n_trials={args.trials}` (population 4, seed 0), run twice in
this benchmark, one after the other on this shared machine:

- **without stage reuse** (`paths.stages_dir=null`: every trial trains its teacher, as every sweep did before):
  {plain_seconds / 60:.1f} min of wall time; its front (validation) has {len(plain_front)} trials;
- **with stage reuse** (the default) and stopped by SIGTERM as soon as at least {stop_after} trials had
  finished, then the same command again: the first invocation ran {first_seconds / 60:.1f} min; the second found
  **{finished_before} of {args.trials} trials finished and ran {ran_after}** (jobs from #{first_new_job}; the
  trial that was running when the sweep stopped is run again), in {second_seconds / 60:.1f} min. Together
  {sweep_seconds / 60:.1f} min ({sweep_seconds / plain_seconds:.2f}× the sweep without reuse; the goal was at
  most half of the 22.7 min measured before: {"met" if sweep_seconds <= 0.5 * 22.7 * 60 else "missed"}). The
  teacher was trained {teachers_trained} time(s) and loaded {teachers_reused} times; {jobs_reused} trial(s)
  proposed a point already run and returned its stored report without training.

Trials of the resumed sweep sorted by size; the Pareto front (max validation accuracy at the target, min size; test
accuracy only reported) has {len(front_jobs)} trials. Plot: [pareto_nsga2.png](pareto_nsga2.png).

| job | parameters | val accuracy % | test accuracy % | sparsity | artifact | vs fp32 | on front |
|---:|---|---:|---:|---:|---:|---:|:---:|
{chr(10).join(trial_rows)}

![NSGA-II Pareto front](pareto_nsga2.png)
"""
    update_results("deep_compression", body)
    print(body)


if __name__ == "__main__":
    main()
