"""A transformer on a real task: channel groups (attention heads + MLP neurons) at 2× fewer FLOPs and int8 (the
embeddings too), against dense and against ONNX Runtime's own static int8 of the dense model.

The task: scikit-learn's digits read as 64 pixel tokens by `PixelTransformer` (token and position embeddings, 2
pre-norm blocks of 4-head attention with q/k/v/o Linear projections and a GELU MLP, width 32;
`model=pixel_transformer`), AdamW (lr 3e-3), `--epochs` epochs, 3 seeds on one split; test accuracy of the last
epoch's model (no model selection).

* dense: the float model.
* channel groups, 2×: `MagnitudePruning(granularity="channel")` ramped over the first two thirds of the run, then
  `export_compact`; the compact network's accuracy and FLOPs (`torch.utils.flop_counter`, attention included). Three
  ways: `scope="layer"` at the smallest share (0.01 steps) whose compact network has at most half the dense FLOPs
  (heads and MLP neurons alike: one channel per head); `scope="global"` at 0.5 of all channels (one ranking across
  heads and neurons: the FLOPs then depend on the run, reported); and the global one distilled from the seed's dense
  model (`KnowledgeDistillation`, alpha 0.5, temperature 4).
* int8 (ours): `QuantizationAwareTraining(include=["@Linear", "@Embedding"])` from half of the run (observers frozen
  at 90 %), exported with `export_onnx`; accuracy of the ONNX file in ONNX Runtime. And the same without the
  embeddings (the default selection).
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
from ptq import ort_accuracy

from lightning_compress import (
    KnowledgeDistillation,
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
    quiet = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    trainer = pl.Trainer(max_epochs=epochs, callbacks=list(callbacks), accelerator="cpu", devices=1, **quiet)
    trainer.fit(module, dm)
    dm.setup("test")
    return module, dm


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
    results: dict[str, list[float]] = {k: [] for k in ("dense", "layer", "global", "global_kd", "int8", "int8_linear",
                                                         "ort_int8")}  # fmt: skip
    ratios: dict[str, list[float]] = {"layer": [], "global": [], "global_kd": []}
    measured: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp())
    paths: dict[str, Path] = {}
    ramp = round(epochs * 2 / 3)
    for seed in range(args.seeds):
        dense, dm = fit(seed, epochs)
        results["dense"].append(100 * evaluate_accuracy(dense, dm.test_dataloader()))
        example = next(iter(dm.test_dataloader()))[0]
        dense_flops = flops_per_sample(dense.net, example)
        measured["params_dense"] = sum(p.numel() for p in dense.net.parameters())
        fp32 = export_float_onnx(dense.net, tmp / f"dense{seed}.onnx", example)
        ort_int8 = ort_static_int8(fp32, tmp / f"ort{seed}.onnx", dm.train_dataloader())
        results["ort_int8"].append(ort_accuracy(ort_int8, dm.test_dataloader()))

        ways = {
            "layer": [MagnitudePruning(final_sparsity=share, granularity="channel", scope="layer", end_epoch=ramp)],
            "global": [MagnitudePruning(final_sparsity=0.5, granularity="channel", scope="global", end_epoch=ramp)],
            "global_kd": [MagnitudePruning(final_sparsity=0.5, granularity="channel", scope="global", end_epoch=ramp),
                          KnowledgeDistillation(dense, alpha=0.5, temperature=4.0)],
        }  # fmt: skip
        for way, callbacks in ways.items():
            pruned, _ = fit(seed, epochs, callbacks)
            compact = export_compact(pruned.net, example)
            ratios[way].append(dense_flops / flops_per_sample(compact, example))
            results[way].append(100 * evaluate_accuracy(compact, dm.test_dataloader()))
            if way == "layer":
                measured["params_compact"] = sum(p.numel() for p in compact.parameters())
                layer_compact = compact

        int8 = tmp
        for key, include in (("int8", EVERYTHING), ("int8_linear", None)):
            qat = QuantizationAwareTraining(start_epoch=epochs // 2, freeze_observers_epoch=round(epochs * 0.9),
                                            include=include)  # fmt: skip
            quantized, _ = fit(seed, epochs, [qat])
            path = export_onnx(quantized, tmp / f"{key}-{seed}.onnx", example)
            results[key].append(100 * onnx_parity(quantized, path, dm.test_dataloader())["accuracy_onnx"])
            if key == "int8":
                int8 = path
        if seed == 0:
            compact_fp32 = export_float_onnx(layer_compact, tmp / "compact.onnx", example)
            paths = {"dense fp32": fp32, "compact fp32 (channel groups per layer, 2x fewer FLOPs)": compact_fp32,
                     "int8, ours (embeddings too)": int8, "int8, ONNX Runtime quantize_static": ort_int8}  # fmt: skip
        print(seed, {k: round(v[-1], 2) for k, v in results.items() if v}, flush=True)
    sessions = {k: ort_session(p, threads=2) for k, p in paths.items()}
    medians = interleaved_ort_medians(sessions, args.rounds, (1, 8, 8), batches=((1, 200), (64, 20)))
    sizes = {k: p.stat().st_size for k, p in paths.items()}

    def fewer(way: str) -> str:
        low, high = min(ratios[way]), max(ratios[way])
        return f"{low:.2f}x" if round(low, 2) == round(high, 2) else f"{low:.2f}–{high:.2f}x"

    rows = [
        ("dense", "dense"),
        (f"channel groups, heads + MLP, per layer ({fewer('layer')} fewer FLOPs)", "layer"),
        (f"channel groups, heads + MLP, one global ranking ({fewer('global')} fewer FLOPs)", "global"),
        (f"channel groups, global, distilled from dense ({fewer('global_kd')} fewer FLOPs)", "global_kd"),
        ("int8, ours (every Linear and both embeddings)", "int8"),
        ("int8, ours (every Linear; embeddings float)", "int8_linear"),
        ("int8, ONNX Runtime `quantize_static` of dense (embeddings float)", "ort_int8"),
    ]
    lines = [
        "## A transformer on digits: heads + MLP channel groups at 2× fewer FLOPs, int8 with its embeddings",
        "",
        f"`python benchmarks/transformer.py` — Machine: {machine()}.",
        "",
        f"`PixelTransformer` (64 pixel tokens, width 32, 2 blocks of 4 heads, {measured['params_dense']:,} "
        f"parameters), AdamW, {epochs} epochs, seeds 0–{args.seeds - 1} on one split, test accuracy % of the last "
        'epoch (mean ± std; "vs dense": Welch\'s t-test over the seeds). Channel groups, ramped over the first two '
        f"thirds then `export_compact`: per layer at share {share} (heads and MLP neurons; {heads} of 8 heads kept, "
        f"{measured['params_compact']:,} parameters), or one global ranking at 0.5 of all channels, alone or distilled "
        "from the seed's dense model. int8: QAT from half of the run, accuracy of the ONNX file in ONNX Runtime. "
        "Peer: ONNX Runtime's `quantize_static` of the dense model (its embeddings stay float). Goals: channel groups "
        "at 2× fewer FLOPs within 1 point of dense, int8 within 0.5.",
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
