"""Step time of compiled training with MagnitudePruning and QuantizationAwareTraining vs compiled plain training.

ResNet-20-style (width 16) on 32×32 inputs (the digits upscaled, 3 channels), as ``step_time.py``. The network is
compiled with ``torch.compile`` (default inductor backend) inside the LightningModule (``module.net =
torch.compile(net)``). Each run compiles afresh (``torch._dynamo.reset()``); its first steps (compilation, and for QAT
the phase changes: float → calibration → quantizing) are left out, and the median of the remaining steps is taken.
The set-ups run interleaved (A B C … A B C …), several rounds; the figure is the median over all measured steps, and
the spread the range of the per-round medians.

    python benchmarks/compile_step_time.py       # writes the `compile_step_time` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics

import lightning.pytorch as pl
import torch
from _common import machine, timed_fit, update_results
from step_time import digits_32
from torch.utils.data import DataLoader

from lightning_compress import MagnitudePruning, QuantizationAwareTraining
from lightning_compress.tasks import ClassificationModule, ResNet20

KINDS = ("eager plain", "compiled plain", "compiled + MagnitudePruning", "compiled + QAT", "eager + QAT")
GOAL = 1.10  # compiled training with a technique, over compiled plain training


def callbacks(kind: str, ramp_epochs: int) -> list[pl.Callback]:
    if kind.endswith("MagnitudePruning"):
        return [MagnitudePruning(final_sparsity=0.9, end_epoch=ramp_epochs)]
    if kind.endswith("QAT"):
        return [QuantizationAwareTraining(start_epoch=0, calibration_steps=2)]
    return []


def run_once(kind: str, loader: DataLoader, steps: int, skip: int, ramp_epochs: int) -> list[float]:
    pl.seed_everything(0)
    torch._dynamo.reset()
    module = ClassificationModule(ResNet20((3, 32, 32), 10, width=16), optimizer="sgd", lr=0.05)
    if kind.startswith("compiled"):
        module.net = torch.compile(module.net)
    return timed_fit(module, loader, callbacks(kind, ramp_epochs), skip + steps + 1, ramp_epochs, skip)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="steps measured per run")
    parser.add_argument("--skip", type=int, default=8, help="first steps left out (compilation, phase changes)")
    parser.add_argument("--ramp-epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loader = digits_32(args.batch_size)
    steps: dict[str, list[float]] = {k: [] for k in KINDS}
    rounds: dict[str, list[float]] = {k: [] for k in KINDS}
    for r in range(args.rounds):
        for kind in KINDS:
            times = run_once(kind, loader, args.steps, args.skip, args.ramp_epochs)
            steps[kind] += times
            rounds[kind].append(statistics.median(times))
            print(f"round {r}: {kind:30s} median step {rounds[kind][-1] * 1e3:7.1f} ms", flush=True)
    base = statistics.median(steps["compiled plain"])
    rows, verdicts = [], []
    for kind in KINDS:
        median = statistics.median(steps[kind])
        lo, hi = min(rounds[kind]), max(rounds[kind])
        ratio = median / base
        rows.append(
            f"| {kind} | {median * 1e3:.1f} | {lo * 1e3:.1f}–{hi * 1e3:.1f} | {ratio:.3f}× | {len(steps[kind])} |"
        )
        if kind.startswith("compiled +"):
            verdicts.append(f"{kind.removeprefix('compiled + ')} {ratio:.3f}× ({'met' if ratio <= GOAL else 'missed'})")
    body = f"""## Step time of compiled training with the techniques

`python benchmarks/compile_step_time.py` — ResNet-20-style (width 16), 32×32 inputs (digits upscaled, 3 channels),
batch {args.batch_size}, SGD, {args.threads} threads. The network is compiled with `torch.compile` (inductor) inside
the LightningModule; every run compiles afresh; its first {args.skip} steps (compilation; for QAT the phase changes
float → calibration → quantizing, one recompilation each) are left out, then {args.steps} steps are timed.
{args.rounds} interleaved rounds; median over all measured steps, spread = range of the per-round medians.
Pruning: a 90 % ramp over {args.ramp_epochs} epochs (masks re-applied in place after every step, updated every few).
QAT: quantizing from the third step (per-channel int8 weights, uint8 activations, BatchNorm folded).
Goal: compiled training with a technique ≤ {GOAL:.2f}× compiled plain training: {"; ".join(verdicts)}.
Machine: {machine()}.

| set-up | median step (ms) | per-round medians (ms) | vs compiled plain | steps measured |
|---|---:|---:|---:|---:|
""" + "\n".join(rows)
    update_results("compile_step_time", body)


if __name__ == "__main__":
    main()
