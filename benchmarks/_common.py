"""Shared pieces of the benchmarks: the RESULTS.md writer, data, the peer's ramp, machine facts."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = (
    "# Benchmark results\n\n"
    "Every figure below was written by the script named in its section; rerun the script to refresh it.\n"
)


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, lightning {pl.__version__}"
    )


def update_results(section: str, body: str) -> None:
    """Replace (or append) the section ``section`` of RESULTS.md, leaving the other scripts' sections."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    begin, end = f"<!-- begin {section} -->", f"<!-- end {section} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def app_run(overrides: list[str], out: Path) -> dict:
    """One job of the `lightning-compress` app (its own `train` on the composed config), quiet, no logger, writing to
    ``out``: its report, plus the wall time in ``seconds``."""
    from lightning_compress.apps.config import compose
    from lightning_compress.apps.train import train

    cfg = compose([*overrides, "logger=none", "distillation_baseline=false", "trainer.enable_progress_bar=false",
                   f"paths.output_dir={out}"])  # fmt: skip
    start = time.perf_counter()
    report = train(cfg)
    report["seconds"] = time.perf_counter() - start
    return report


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


class StepTimer(Callback):
    """Wall time between consecutive ``on_train_batch_start`` calls: one whole step with every hook."""

    def __init__(self, skip: int = 5) -> None:
        self.skip, self.stamps = skip, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.stamps.append(time.perf_counter())

    @property
    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)][self.skip :]


class StopAfter(Callback):
    """Ends fit after a window of steps: the window of a longer run that a schedule was set up for."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def timed_fit(module, loader, callbacks, stop_after: int, max_epochs: int, skip: int) -> tuple[list[float], pl.Trainer]:
    """Fit ``module`` on ``loader`` with ``callbacks`` on a quiet CPU Trainer (no validation, logger, checkpoints,
    progress bar or summary) set up for ``max_epochs`` and stopped after ``stop_after`` optimizer steps: the times of
    its steps after the first ``skip`` (:class:`StepTimer`), and the Trainer."""
    timer = StepTimer(skip=skip)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=max_epochs, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, StopAfter(stop_after), timer],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    return timer.steps, trainer


def cubic_amounts(final: float, end_epoch: int, initial: float = 0.0):
    """Per-epoch ``amount`` for Lightning's ModelPruning that makes its cumulative sparsity follow the same
    cubic ramp as MagnitudePruning. torch.nn.utils.prune prunes a fraction of the *remaining* weights, so the
    amount at epoch e is (s_e − s_{e−1}) / (1 − s_{e−1}). ModelPruning prunes at the end of each epoch."""
    from lightning_compress.core.schedules import sparsity_at

    def target(epoch: int) -> float:
        return sparsity_at(epoch / end_epoch, initial, final)

    def amount(epoch: int) -> float:
        # ModelPruning calls this with the current epoch at that epoch's end; after it the sparsity must
        # be the ramp's value at epoch + 1.
        if epoch >= end_epoch:
            return 0.0
        before, after = target(epoch) if epoch > 0 else 0.0, target(epoch + 1)
        return max(0.0, (after - before) / (1.0 - before))

    return amount


def interleaved_ort_medians(
    sessions: dict, rounds: int, sample_shape: tuple[int, ...], batches=((1, 100), (256, 3)), vocabulary: int = 0
) -> dict[tuple[str, int], list[float]]:
    """Per (model, batch size): the median call time of each round; within a round every model runs in turn, so that
    all see the same machine load. ``batches``: (batch size, calls per round). ``vocabulary``: the inputs are token
    ids (int64) below it instead of floats in [0, 1)."""
    import numpy as np

    medians: dict[tuple[str, int], list[float]] = {(k, b): [] for k in sessions for b, _ in batches}
    for _ in range(rounds):
        for batch, repeats in batches:
            rng = np.random.default_rng(0)
            shape = (batch, *sample_shape)
            inputs = rng.integers(0, vocabulary, shape) if vocabulary else rng.random(shape, dtype=np.float32)
            for kind, session in sessions.items():
                name = session.get_inputs()[0].name
                session.run(None, {name: inputs})
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    session.run(None, {name: inputs})
                    times.append(time.perf_counter() - start)
                medians[kind, batch].append(statistics.median(times))
    return medians
