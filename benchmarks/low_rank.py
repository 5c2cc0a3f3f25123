"""Low-rank factorization: the small CNN's big classifier at 4x fewer parameters (gradual against one-shot), and
low rank against channel groups at the same FLOPs on the ResNet-20-style network.

Part 1 — digits (8×8), the small CNN (`recipe=dense`: width 32, classifier 1024→128→10, AdamW, 30 epochs), seeds
0…n-1 on one split. `LowRankFactorization(ratio=4, include="classifier.1")`: *gradual* ramps the budget over epochs
0–20 (cubic), *one-shot* trains dense for 20 epochs and cuts to the final ranks at once, then fine-tunes 10 (the same
30 epochs). Then `export_compact(ranks=...)`, checked on the whole test split.

Part 2 — digits, the ResNet-20-style network (width 16, 8×8 inputs), 30 epochs: dense; channel groups
(`MagnitudePruning(granularity="channel", scope="layer")`, the share whose compact network has at most half the dense
FLOPs) and low rank (`LowRankFactorization(budget="flops", ratio=r)` over every convolution but the first, ``r`` the
smallest in 0.05 steps whose compact network has at most half the dense FLOPs), both ramped over epochs 0–20. Then the
two compact networks in ONNX Runtime (2 threads, batch 256, interleaved rounds; median and lowest–highest round).

A difference is called beyond noise when Welch's t-test over the seeds gives p < 0.05.

    python benchmarks/low_rank.py        # writes the `low_rank` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from _common import interleaved_ort_medians, machine, mean_std, update_results
from mnist1d_accuracy import verdict

from lightning_compress import LowRankFactorization, MagnitudePruning, export_compact
from lightning_compress.analysis.latency import ort_session
from lightning_compress.analysis.report import flops_per_sample
from lightning_compress.apps.config import compose, instantiate
from lightning_compress.export.onnx import export_float_onnx

EPOCHS, RAMP_END = 30, 20
#: The 3×3 convolutions of the ResNet-20's residual blocks (not the stem: 1 input channel leaves nothing to factor).
RESNET_CONVS = r"\.body\.\d$"


def task(seed: int, model: str):
    cfg = compose(["recipe=dense", f"model={model}", "logger=none", "callbacks=none", "paths.output_dir=/tmp/unused"])
    pl.seed_everything(seed)
    dm = instantiate(cfg.data)
    net = instantiate(cfg.model, input_shape=dm.input_shape, num_classes=dm.num_classes)
    return cfg, dm, instantiate(cfg.module, net=net, num_classes=dm.num_classes)


def fit(cfg, module, dm, epochs: int, callbacks=()) -> pl.Trainer:
    trainer = instantiate(cfg.trainer, max_epochs=epochs, callbacks=list(callbacks), logger=False,
                          enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return trainer


def test_batches(dm) -> list[torch.Tensor]:
    dm.setup("test")
    return [x for x, _ in dm.test_dataloader()]


def run(seed: int, model: str, callback=None) -> dict:
    """Train one network; test accuracy (%), the compact network (checked on the whole test split) and its figures."""
    cfg, dm, module = task(seed, model)
    start = time.perf_counter()
    trainer = fit(cfg, module, dm, EPOCHS, [callback] if callback is not None else [])
    seconds = time.perf_counter() - start
    accuracy = 100 * trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"]
    batches = test_batches(dm)
    ranks = getattr(callback, "ranks", None) or {}
    channels = isinstance(callback, MagnitudePruning)
    compact = module.net
    if callback is not None:
        ranks = {n.removeprefix("net."): r for n, r in ranks.items()}
        compact = export_compact(module.net.eval(), batches[0], check_inputs=batches, ranks=ranks, channels=channels)
    return {
        "accuracy": accuracy,
        "seconds": seconds,
        "params": sum(p.numel() for p in compact.parameters()),
        "flops": flops_per_sample(compact, batches[0][:1]),
        "difference": getattr(compact, "max_abs_difference", 0.0),
        "compact": compact.eval(),
        "example": batches[0],
    }


def one_shot_classifier(seed: int) -> dict:
    """Dense for 20 epochs, the final ranks at once at epoch 20, 10 epochs of fine-tuning at them."""
    return run(seed, "small_cnn", LowRankFactorization(ratio=4, include=r"classifier\.1$", start_epoch=RAMP_END,
                                                       end_epoch=RAMP_END))  # fmt: skip


def flops_ratio_for(goal: float) -> float:
    """The smallest low-rank FLOPs ratio (0.05 steps) over the selected convolutions that halves the whole network."""
    from lightning_compress import low_rank_
    from lightning_compress.tasks import ResNet20

    x = torch.randn(4, 1, 8, 8)
    dense = flops_per_sample(ResNet20((1, 8, 8), 10, width=16), x[:1])
    for ratio in np.arange(1.5, 8.0, 0.05):
        torch.manual_seed(0)
        net = ResNet20((1, 8, 8), 10, width=16).eval()
        ranks = low_rank_(net, float(ratio), budget="flops", include=RESNET_CONVS, example_input=x)
        compact = export_compact(net, x, ranks=ranks, channels=False)
        if dense / flops_per_sample(compact, x[:1]) >= goal:
            return round(float(ratio), 2)
    raise ValueError(f"no low-rank ratio reaches {goal}x fewer FLOPs")


def channel_share_for(goal: float) -> float:
    from lightning_compress.pruning import prune_channel_groups_
    from lightning_compress.tasks import ResNet20

    x = torch.randn(4, 1, 8, 8)
    dense = flops_per_sample(ResNet20((1, 8, 8), 10, width=16), x[:1])
    for share in np.arange(0.05, 0.95, 0.01):
        net = ResNet20((1, 8, 8), 10, width=16).eval()
        prune_channel_groups_(net, x, float(share), scope="layer")
        if dense / flops_per_sample(export_compact(net, x), x[:1]) >= goal:
            return round(float(share), 2)
    raise ValueError(f"no channel share reaches {goal}x fewer FLOPs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    seeds = list(range(args.seeds))
    results: dict[str, list[dict]] = {}

    def record(kind: str, out: dict) -> None:
        results.setdefault(kind, []).append(out)
        print(kind, {k: v for k, v in out.items() if k not in ("compact", "example")}, flush=True)

    for seed in seeds:
        record("small CNN, dense", run(seed, "small_cnn"))
        gradual = LowRankFactorization(ratio=4, include=r"classifier\.1$", end_epoch=RAMP_END)
        record("small CNN, classifier.1 at 4x fewer parameters, gradual (epochs 0-20)", run(seed, "small_cnn", gradual))
        record("small CNN, classifier.1 at 4x fewer parameters, one-shot at epoch 20", one_shot_classifier(seed))
    share = ratio = None
    if not args.skip_resnet:
        share, ratio = channel_share_for(2), flops_ratio_for(2)
        for seed in seeds:
            record("ResNet-20 w16, dense", run(seed, "resnet20"))
            groups = MagnitudePruning(final_sparsity=share, granularity="channel", scope="layer", end_epoch=RAMP_END)
            record("ResNet-20 w16, channel groups, 2x fewer FLOPs", run(seed, "resnet20", groups))
            low = LowRankFactorization(ratio=ratio, budget="flops", include=RESNET_CONVS, end_epoch=RAMP_END)
            record("ResNet-20 w16, low rank, 2x fewer FLOPs", run(seed, "resnet20", low))

    rows = []
    for kind, runs in results.items():
        dense_kind = kind.split(",")[0] + ", dense"
        base = [r["accuracy"] for r in results[dense_kind]]
        accuracy = [r["accuracy"] for r in runs]
        versus = "—" if kind == dense_kind else verdict(accuracy, base)
        difference = max(r["difference"] for r in runs)
        seconds = statistics.mean(r["seconds"] for r in runs)
        fewer = results[dense_kind][0]["flops"] / runs[0]["flops"]
        rows.append(f"| {kind} | {mean_std(accuracy)} | {versus} | {runs[0]['params']:,} | {fewer:.2f}× | "
                    f"{difference:.1e} | {seconds:.0f} s |")  # fmt: skip
    speed_rows = []
    if not args.skip_resnet:
        with tempfile.TemporaryDirectory() as tmp:
            kinds = [k for k in results if k.startswith("ResNet")]
            sessions = {}
            for i, kind in enumerate(kinds):
                first = results[kind][0]
                sessions[kind] = ort_session(export_float_onnx(first["compact"], Path(tmp) / f"{i}.onnx",
                                                               first["example"]), 2)  # fmt: skip
            medians = interleaved_ort_medians(sessions, args.rounds, (1, 8, 8), batches=((256, 5),))
            dense_kind = "ResNet-20 w16, dense"
            for kind in kinds:
                ups = [d / m for d, m in zip(medians[dense_kind, 256], medians[kind, 256], strict=True)]
                speed_rows.append(f"| {kind} | {statistics.median(medians[kind, 256]) * 1e3:.2f} | "
                                  f"{statistics.median(ups):.2f}× ({min(ups):.2f}–{max(ups):.2f}) |")  # fmt: skip
    body = (
        f"""## Low-rank factorization: a classifier at 4× fewer parameters; low rank vs channel groups at 2× fewer FLOPs

`python benchmarks/low_rank.py` — Machine: {machine()}.

Digits, {EPOCHS} epochs, seeds 0–{args.seeds - 1}, test accuracy % (mean ± std); "vs dense" with Welch's t-test over
the seeds. Parameters and FLOPs are those of the compact network (`export_compact`), whose largest absolute logit
difference from the trained model on the whole test split is in the next-to-last column. Time: training, per run.
ResNet-20: channel share {share}, low-rank FLOPs ratio over the convolutions after the first {ratio}.

| model | accuracy | vs dense | parameters | FLOPs reduction | export difference | time |
|---|---:|---|---:|---:|---:|---:|
"""
        + "\n".join(rows)
        + (
            f"""

ONNX Runtime, 2 threads, batch 256, {args.rounds} interleaved rounds (seed 0's compact networks): median latency (ms)
and speed-up over dense (median, lowest–highest round).

| model | batch 256 (ms) | vs dense |
|---|---:|---:|
"""
            + "\n".join(speed_rows)
            if speed_rows
            else ""
        )
    )
    update_results("low_rank", body)


if __name__ == "__main__":
    main()
