"""A transformer on a real task: channel groups (attention heads + MLP neurons) at 2× fewer FLOPs and int8 (the
embeddings too), against dense and against ONNX Runtime's own static int8 of the dense model.

The task: scikit-learn's digits read as 64 pixel tokens by `PixelTransformer` (token and position embeddings, 2
pre-norm blocks of 4-head attention with q/k/v/o Linear projections and a GELU MLP, width 32; `model=pixel_transformer`),
AdamW (lr 3e-3), `--epochs` epochs, 3 seeds on one split; test accuracy of the last epoch's model (no model selection).

* dense: the float model.
* channel groups, 2×: `MagnitudePruning(granularity="channel", scope="layer")` ramped over the first two thirds of
  the run to the smallest share (0.01 steps) whose compact network has at most half the dense FLOPs (heads and MLP
  neurons alike: one channel per head), then `export_compact`; the compact network's accuracy and FLOPs
  (`torch.utils.flop_counter`, attention included).
* int8 (ours): `QuantizationAwareTraining(include=["@Linear", "@Embedding"])` from three quarters of the run (observers
  frozen at 90 %), exported with `export_onnx`; accuracy of the ONNX file in ONNX Runtime.
* int8 (ONNX Runtime): `quantize_static` (QDQ, per-channel int8 weights, uint8 activations, calibrated on 8 training
  batches) of the dense model's float ONNX; accuracy in ONNX Runtime.

Then ONNX Runtime latency (2 threads, interleaved rounds, seed 0's models): dense fp32, compact fp32, our int8, ONNX
Runtime's int8.

    python benchmarks/transformer.py      # writes the `transformer` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from _common import interleaved_ort_medians, machine, mean_std, update_results
from mnist1d_accuracy import verdict
from ort_latency import ort_static_int8

from lightning_compress import (
    MagnitudePruning,
    QuantizationAwareTraining,
    export_compact,
    export_onnx,
    onnx_parity,
)
from lightning_compress.analysis.latency import ort_session
from lightning_compress.analysis.report import flops_per_sample
from lightning_compress.core.metrics import evaluate_accuracy
from lightning_compress.export.onnx import export_float_onnx
from lightning_compress.pruning import prune_channel_groups_
from lightning_compress.tasks import ClassificationModule, DigitsDataModule, PixelTransformer

EVERYTHING = ["@Linear", "@Embedding"]


def make() -> PixelTransformer:
    return PixelTransformer((1, 8, 8), 10, dim=32, depth=2, heads=4)


def share_for(x: torch.Tensor, goal: float) -> tuple[float, float, int]:
    """The smallest channel share (0.01 steps) whose compact network has at most 1/goal of the dense FLOPs, the FLOPs
    ratio and the number of heads it keeps."""
    dense = flops_per_sample(make(), x)
    for share in np.arange(0.05, 0.95, 0.01):
        model = make().eval()
        prune_channel_groups_(model, x, float(share), scope="layer")
        compact = export_compact(model, x)
        ratio = dense / flops_per_sample(compact, x)
        if ratio >= goal:
            return round(float(share), 2), ratio, sum(b.attention.heads for b in compact.blocks)
    raise ValueError(f"no share reaches {goal}x fewer FLOPs")


def fit(seed: int, epochs: int, callbacks=()) -> tuple[ClassificationModule, DigitsDataModule]:
    pl.seed_everything(seed)
    dm = DigitsDataModule(seed=0)
    module = ClassificationModule(make())
    trainer = pl.Trainer(max_epochs=epochs, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)  # fmt: skip
    trainer.fit(module, dm)
    dm.setup("test")
    return module, dm


def onnx_accuracy(path: Path, loader) -> float:
    session = ort_session(path, threads=2)
    name = session.get_inputs()[0].name
    right = total = 0
    for x, y in loader:
        logits = session.run(None, {name: x.numpy()})[0]
        right += int((logits.argmax(1) == y.numpy()).sum())
        total += len(y)
    return right / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    epochs = args.epochs
    x = torch.rand(8, 1, 8, 8)
    share, ratio, heads = share_for(x, 2.0)
    print(f"share {share}: {ratio:.2f}x fewer FLOPs, {heads} of 8 heads kept")
    results: dict[str, list[float]] = {"dense": [], "channel": [], "int8": [], "ort_int8": []}
    measured: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp())
    paths: dict[str, Path] = {}
    for seed in range(args.seeds):
        dense, dm = fit(seed, epochs)
        results["dense"].append(100 * evaluate_accuracy(dense, dm.test_dataloader()))
        example = next(iter(dm.test_dataloader()))[0]
        fp32 = export_float_onnx(dense.net, tmp / f"dense{seed}.onnx", example)
        ort_int8 = ort_static_int8(fp32, tmp / f"ort{seed}.onnx", dm.train_dataloader())
        results["ort_int8"].append(100 * onnx_accuracy(ort_int8, dm.test_dataloader()))

        pruning = MagnitudePruning(final_sparsity=share, granularity="channel", scope="layer",
                                   end_epoch=round(epochs * 2 / 3))  # fmt: skip
        pruned, _ = fit(seed, epochs, [pruning])
        compact = export_compact(pruned.net, example)
        measured["flops"] = flops_per_sample(dense.net, example) / flops_per_sample(compact, example)
        measured["params_dense"] = sum(p.numel() for p in dense.net.parameters())
        measured["params_compact"] = sum(p.numel() for p in compact.parameters())
        results["channel"].append(100 * evaluate_accuracy(compact, dm.test_dataloader()))

        qat = QuantizationAwareTraining(start_epoch=round(epochs * 0.75), freeze_observers_epoch=round(epochs * 0.9),
                                        include=EVERYTHING)  # fmt: skip
        quantized, _ = fit(seed, epochs, [qat])
        int8 = export_onnx(quantized, tmp / f"int8-{seed}.onnx", example)
        results["int8"].append(100 * onnx_parity(quantized, int8, dm.test_dataloader())["accuracy_onnx"])
        if seed == 0:
            paths = {"dense fp32": fp32, "compact fp32 (2x fewer FLOPs)": export_float_onnx(
                compact, tmp / "compact.onnx", example), "int8, ours": int8, "int8, ONNX Runtime quantize_static": ort_int8}  # fmt: skip
        print(seed, {k: round(v[-1], 2) for k, v in results.items()})
    sessions = {k: ort_session(p, threads=2) for k, p in paths.items()}
    medians = interleaved_ort_medians(sessions, args.rounds, (1, 8, 8), batches=((1, 200), (64, 20)))
    sizes = {k: p.stat().st_size for k, p in paths.items()}

    rows = [
        ("dense", "dense"),
        (f"channel groups, heads + MLP ({ratio:.2f}x fewer FLOPs)", "channel"),
        ("int8, ours (embeddings too)", "int8"),
        ("int8, ONNX Runtime `quantize_static` of dense", "ort_int8"),
    ]
    lines = [
        "## A transformer on digits: heads + MLP channel groups at 2× fewer FLOPs, int8 with its embeddings",
        "",
        f"`python benchmarks/transformer.py` — Machine: {machine()}.",
        "",
        f"`PixelTransformer` (64 pixel tokens, width 32, 2 blocks of 4 heads, {measured['params_dense']:,} parameters), "
        f"AdamW, {epochs} epochs, seeds 0–{args.seeds - 1} on one split, test accuracy % of the last epoch (mean ± std; "
        '"vs dense": Welch\'s t-test over the seeds). Channel groups: share '
        f"{share} per layer (heads and MLP neurons; {heads} of 8 heads kept), ramped over the first two thirds, then "
        f"`export_compact` ({measured['params_compact']:,} parameters, {measured['flops']:.2f}× fewer FLOPs measured). "
        "int8: QAT from 75 % of the run, every Linear and both embeddings, accuracy of the ONNX file in ONNX Runtime. "
        "Peer: ONNX Runtime's `quantize_static` of the dense model (its embeddings stay float).",
        "",
        "| model | accuracy | vs dense |",
        "|---|---:|---|",
    ]
    for label, key in rows:
        against = "—" if key == "dense" else verdict(results[key], results["dense"])
        lines.append(f"| {label} | {mean_std(results[key])} | {against} |")
    lines += [
        "",
        f"ONNX Runtime, 2 threads, seed 0's models, {args.rounds} interleaved rounds: median latency (ms) and the "
        "speed-up over dense fp32 (median of the paired rounds, lowest–highest).",
        "",
        "| model | file (KiB) | batch 1 (ms) | vs dense | batch 64 (ms) | vs dense |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind in paths:
        cells = []
        for batch in (1, 64):
            own, base = medians[kind, batch], medians["dense fp32", batch]
            speed = sorted(b / o for b, o in zip(base, own, strict=True))
            cells += [f"{1000 * statistics.median(own):.3f}",
                      f"{statistics.median(speed):.2f}× ({speed[0]:.2f}–{speed[-1]:.2f})"]  # fmt: skip
        lines.append(f"| {kind} | {sizes[kind] / 1024:.0f} | {' | '.join(cells)} |")
    update_results("transformer", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
