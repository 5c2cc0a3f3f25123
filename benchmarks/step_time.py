"""Step time of MagnitudePruning (unstructured, and by channel groups) vs plain training vs Lightning's ModelPruning,
in one process.

ResNet-20-style (width 16) on 32×32 inputs: the digits, upscaled to 32×32 and repeated over 3 channels
(real images, no download). The three set-ups run interleaved (A B C A B C …) so that drift of the
machine hits all of them alike; the figure is the median step over all repetitions.

    python benchmarks/step_time.py            # writes the `step_time` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import machine, timed_fit, update_results
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import MagnitudePruning
from lightning_compress.core.selection import select_modules
from lightning_compress.tasks import ClassificationModule, DigitsDataModule, ResNet20
from lightning_compress.trainer.progress import MIN_STEPS_BETWEEN_UPDATES


def digits_32(batch_size: int) -> DataLoader:
    dm = DigitsDataModule(seed=0)
    dm.setup()
    x, y = dm.train_set.tensors
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, drop_last=True)


SHORT_RAMP = 60  # optimizer steps: a ramp shorter than 50 x the default floor between updates
KINDS = (
    "plain",
    "MagnitudePruning",
    f"MagnitudePruning, {SHORT_RAMP}-step ramp",
    "MagnitudePruning, update every step",
    "MagnitudePruning, channel groups",
    "MagnitudePruning, taylor",
    "MagnitudePruning, movement",
    "MagnitudePruning, channel groups, taylor",
    "ModelPruning",
)


class TimedMagnitudePruning(MagnitudePruning):
    """MagnitudePruning that adds up the wall time of its per-step and per-epoch hooks."""

    hook_seconds = 0.0

    def _timed(self, hook, *args):
        start = time.perf_counter()
        hook(*args)
        TimedMagnitudePruning.hook_seconds += time.perf_counter() - start

    def on_train_batch_end(self, *args):
        self._timed(super().on_train_batch_end, *args)

    def on_train_epoch_end(self, *args):
        self._timed(super().on_train_epoch_end, *args)

    def on_before_optimizer_step(self, *args):
        self._timed(super().on_before_optimizer_step, *args)


def make_callbacks(kind: str, module: nn.Module, ramp_epochs: int, steps_per_epoch: int) -> list[pl.Callback]:
    if kind == "plain":
        return []
    if kind == "MagnitudePruning":  # defaults: 50 mask updates along the ramp
        return [TimedMagnitudePruning(final_sparsity=0.9, end_epoch=ramp_epochs)]
    if kind.endswith("-step ramp"):  # defaults on a short ramp: the floor between mask updates decides
        return [TimedMagnitudePruning(final_sparsity=0.9, end_epoch=SHORT_RAMP / steps_per_epoch)]
    if kind == "MagnitudePruning, update every step":
        return [TimedMagnitudePruning(final_sparsity=0.9, end_epoch=ramp_epochs, update_every_n_steps=1)]
    if kind == "MagnitudePruning, channel groups":  # group masks (weights, biases, BatchNorm) re-applied every step
        return [TimedMagnitudePruning(final_sparsity=0.5, granularity="channel", end_epoch=ramp_epochs)]
    if kind in ("MagnitudePruning, taylor", "MagnitudePruning, movement"):  # + scores from w·g after every step
        return [TimedMagnitudePruning(final_sparsity=0.9, end_epoch=ramp_epochs, criterion=kind.split(", ")[1])]
    if kind == "MagnitudePruning, channel groups, taylor":  # + per-channel Σ w·g over every coupled parameter
        return [TimedMagnitudePruning(final_sparsity=0.5, granularity="channel", end_epoch=ramp_epochs,
                                      criterion="taylor")]  # fmt: skip
    params = [(m, "weight") for _, m in select_modules(module)]
    return [
        ModelPruning(
            "l1_unstructured", parameters_to_prune=params, amount=0.5, use_lottery_ticket_hypothesis=False, verbose=0
        )
    ]


def run_once(kind: str, loader: DataLoader, steps: int, ramp_epochs: int) -> tuple[list[float], float]:
    """Step times of one run, and the seconds per step spent in MagnitudePruning's hooks."""
    pl.seed_everything(0)
    TimedMagnitudePruning.hook_seconds = 0.0
    module = ClassificationModule(ResNet20((3, 32, 32), 10, width=16), optimizer="sgd", lr=0.05)
    callbacks = make_callbacks(kind, module, ramp_epochs, len(loader))
    times, trainer = timed_fit(module, loader, callbacks, steps, ramp_epochs, skip=3)
    return times, TimedMagnitudePruning.hook_seconds / trainer.global_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25, help="steps measured per run")
    parser.add_argument("--ramp-epochs", type=int, default=60, help="length of the run the schedule is set for")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loader = digits_32(args.batch_size)
    ramp_steps = args.ramp_epochs * len(loader)
    steps: dict[str, list[float]] = {k: [] for k in KINDS}
    hooks: dict[str, list[float]] = {k: [] for k in KINDS}
    run_once("plain", loader, 5, 1)  # warm-up: allocator, kernels
    for _ in range(args.repeats):
        for kind in KINDS:
            times, hook = run_once(kind, loader, args.steps, args.ramp_epochs)
            steps[kind] += times
            hooks[kind].append(hook)
    plain = statistics.median(steps["plain"])
    rows = []
    for kind in KINDS:
        median = statistics.median(steps[kind])
        hook = statistics.mean(hooks[kind])
        hook_text = f"{hook * 1e3:.2f} ms ({1 + hook / plain:.4f}×)" if "Magnitude" in kind else "—"
        rows.append(f"| {kind} | {median * 1e3:.1f} | {median / plain:.3f}× | {hook_text} | {len(steps[kind])} |")
        print(f"{kind:38s} median step {median * 1e3:7.1f} ms  {median / plain:.3f}× plain  hooks {hook_text}")
    every = max(MIN_STEPS_BETWEEN_UPDATES, round(ramp_steps / 50))
    short = statistics.median(steps[KINDS[2]]) / plain
    body = f"""## Step time: MagnitudePruning vs plain vs Lightning ModelPruning

`python benchmarks/step_time.py` — ResNet-20-style (width 16, 0.27 M weights), 32×32 inputs (digits upscaled to
32×32, 3 channels), batch {args.batch_size}, SGD, {len(loader)} steps per epoch. Each run is set up for
{args.ramp_epochs} epochs ({ramp_steps} optimizer steps, the pruning ramp spanning all of them) and timed over its
first {args.steps} steps; {args.repeats} interleaved repetitions; median step, every hook included.
MagnitudePruning with its defaults recomputes the masks 50 times along the ramp (here every {every} steps), at
most every {MIN_STEPS_BETWEEN_UPDATES} steps, and re-applies them after every optimizer step; the third row is a
{SHORT_RAMP}-step ramp with the defaults (without the floor: an update after every step); the fourth recomputes the
masks after every step (`update_every_n_steps=1`, the worst case); the fifth removes 50 % of the channels by
dependency group (`granularity="channel"`: group masks over weights, biases and BatchNorm re-applied after every
step; goal ≤ 1.05× plain); the sixth to eighth add the gradient criteria (`criterion="taylor"` / `"movement"`:
`w·∂L/∂w` added to the scores before every optimizer step, per weight or per channel group; goal ≤ 1.05× plain).
ModelPruning prunes 50 % of the remaining weights
at every epoch end (forward pre-hook, torch.nn.utils.prune). Goals: MagnitudePruning ≤ 1.02× plain; any ramp length
with the defaults ≤ 1.03× ({SHORT_RAMP}-step ramp: {short:.3f}×, {"met" if short <= 1.03 else "missed"}).
"Hook time" is the wall time spent inside MagnitudePruning's own hooks per step (mask updates, re-applying
masks, logging), and in brackets plain step + that time over plain step: the overhead free of the machine's
noise, which on this shared 2-core machine moves whole-step medians by a few percent between runs.
Machine: {machine()}.

| set-up | median step (ms) | vs plain | hook time per step | steps measured |
|---|---:|---:|---:|---:|
""" + "\n".join(rows)
    update_results("step_time", body)


if __name__ == "__main__":
    main()
