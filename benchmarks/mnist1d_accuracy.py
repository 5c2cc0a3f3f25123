"""The accuracy benchmarks on MNIST-1D, where compression costs accuracy: pruning curve against Lightning's
ModelPruning, QAT at 8 / 4 / 2 weight bits against float (ONNX Runtime), distillation gap — with enough seeds that
a stated difference can be told from the seed spread.

Task: MNIST-1D generated offline (`mnist1d.make_dataset`, the paper's 4,000 / 1,000 signals, 10 % of the training
signals held out for validation; the split is the same for every run, the training seed changes), the paper's CNN
with BatchNorm (`recipe=mnist1d_dense`: 5,360 weights, AdamW, 30 epochs). The runs reuse the digits benchmarks'
functions (`accuracy.train`, `qat_accuracy.run`, `distillation.fit`) with the MNIST-1D recipes. A difference is
called beyond noise when Welch's t-test over the seeds gives p < 0.05, within noise otherwise.

    python benchmarks/mnist1d_accuracy.py            # 5 seeds; writes the `mnist1d` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
from _common import machine, mean_std, update_results
from accuracy import train as prune_run
from distillation import fit
from qat_accuracy import agreement_cell, run_all
from scipy.stats import ttest_ind

from lightning_compress import KnowledgeDistillation
from lightning_compress.tasks import CNN1D, MNIST1DDataModule

SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9)
QAT_KINDS = ("float", "int8", "w4", "w2-lsq")
#: Published anchors (Greydanus 2020, default MNIST-1D set): CNN about 94 %, MLP about 68 %.
PAPER_CNN = 94.0


def verdict(a: list[float], b: list[float]) -> str:
    """``mean(a) − mean(b)`` and whether it exceeds the seed spread (Welch's t-test, p < 0.05)."""
    delta = statistics.mean(a) - statistics.mean(b)
    spread = len(a) > 1 and (statistics.stdev(a) or statistics.stdev(b))
    p = float(ttest_ind(a, b, equal_var=False).pvalue) if spread else 1.0
    return f"{delta:+.2f} (p = {p:.3f}, {'beyond noise' if p < 0.05 else 'within noise'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--end-epoch", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
    seeds = list(range(args.seeds))
    start = time.perf_counter()

    def prune(method: str, sparsity: float | None = None) -> tuple[list[float], float]:
        out = [prune_run(s, method, sparsity, args.epochs, args.end_epoch, recipe="mnist1d_dense") for s in seeds]
        print(method, sparsity, [round(a, 2) for a, _ in out], flush=True)
        return [a for a, _ in out], statistics.mean(s for _, s in out)

    dense, _ = prune("dense")
    prune_rows = []
    for s in SPARSITIES:
        ours, ours_sp = prune("MagnitudePruning", s)
        peer, peer_sp = prune("ModelPruning", s)
        prune_rows.append(
            f"| {s:.0%} | {mean_std(ours)} ({ours_sp:.2%}) | {mean_std(peer)} ({peer_sp:.2%}) | {verdict(ours, dense)} "
            f"| {verdict(ours, peer)} |"
        )

    qat = run_all(len(seeds), list(QAT_KINDS), args.epochs, task="mnist1d")
    qat_acc = {k: [r["accuracy"] for r in v] for k, v in qat.items()}
    qat_rows = []
    for kind in QAT_KINDS:
        qat_rows.append(
            f"| {kind} | {mean_std(qat_acc[kind])} | "
            f"{verdict(qat_acc[kind], qat_acc['float']) if kind != 'float' else '—'} | {agreement_cell(qat[kind])} |"
        )

    kd: dict[str, list[float]] = {"teacher": [], "alone": [], "distilled": []}
    for seed in seeds:
        pl.seed_everything(seed)
        teacher_acc, teacher = fit(CNN1D(width=64), [], args.epochs, lr=3e-3, dm=MNIST1DDataModule())
        pl.seed_everything(seed)
        alone, _ = fit(CNN1D(width=8), [], args.epochs, lr=3e-3, dm=MNIST1DDataModule())
        pl.seed_everything(seed)
        distiller = KnowledgeDistillation(teacher.net, temperature=4.0, alpha=0.9)
        distilled, _ = fit(CNN1D(width=8), [distiller], args.epochs, lr=3e-3, dm=MNIST1DDataModule())
        for key, value in (("teacher", teacher_acc), ("alone", alone), ("distilled", distilled)):
            kd[key].append(value)
        print(seed, teacher_acc, alone, distilled, flush=True)
    t, a, d = (statistics.mean(kd[k]) for k in ("teacher", "alone", "distilled"))
    recovery = (d - a) / (t - a) if t != a else float("nan")
    gain = verdict(kd["distilled"], kd["alone"])
    minutes = (time.perf_counter() - start) / 60

    body = (
        f"""## MNIST-1D: pruning, quantization and distillation where compression costs accuracy

`python benchmarks/mnist1d_accuracy.py` — MNIST-1D generated offline (the paper's 4,000 training / 1,000 test
signals; 10 % of the training signals held out for validation, the same split in every run, so one test signal is
0.1 points), the paper's CNN with BatchNorm (`recipe=mnist1d_dense`, 5,360 weights), AdamW, {args.epochs} epochs,
training seeds {seeds}; test accuracy (%) mean ± std. A difference is *beyond noise* when Welch's t-test over the
seeds gives p < 0.05. {minutes:.0f} min in all. Machine: {machine()}.

Dense: **{mean_std(dense)}** (the paper reports about {PAPER_CNN:.0f} % for its CNN and 68 % for an MLP; our CNN adds
BatchNorm and trains 30 epochs with AdamW on 3,600 signals).

### Pruning: MagnitudePruning vs Lightning's ModelPruning

Cubic ramp over epochs 0–{args.end_epoch}, one global ranking; ModelPruning: global L1 unstructured, amounts per
epoch that follow the same cumulative ramp, no lottery-ticket reset (as in `benchmarks/accuracy.py`); measured
sparsity in brackets.

| sparsity | MagnitudePruning | ModelPruning | ours − dense | ours − ModelPruning |
|---|---:|---:|---|---|
"""
        + "\n".join(prune_rows)
        + """

### Quantization-aware training, measured in ONNX Runtime

int8 = `recipe=mnist1d_qat_int8` (QAT from epoch 10, BatchNorm frozen at 25, ranges at 27, layer outputs
quantized); w4 = `recipe=mnist1d_qat_w4` (4-bit weights, the first and the last layer at 8); w2-lsq = 2-bit
weights with learned step sizes, first and last at 8. Every quantized row is the exported ONNX model run in ONNX
Runtime (agreement: the lowest top-1 agreement with the fake-quantized model over the seeds).

| model | accuracy | vs float | agreement (%) |
|---|---:|---|---:|
"""
        + "\n".join(qat_rows)
        + f"""

### Distillation: a CNN of width 64 into one of width 8

Teacher `CNN1D(width=64)`, student `CNN1D(width=8)` alone and distilled (T = 4, alpha = 0.9), lr 3e-3, all labels.
Recovery = (distilled − alone) / (teacher − alone).

| teacher | student alone | distilled | distilled − alone | recovery |
|---:|---:|---:|---|---:|
| {mean_std(kd["teacher"])} | {mean_std(kd["alone"])} | {mean_std(kd["distilled"])} | {gain} | {recovery:.0%} |
"""
    )
    update_results("mnist1d", body)


if __name__ == "__main__":
    main()
