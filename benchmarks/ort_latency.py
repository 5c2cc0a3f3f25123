"""ONNX Runtime latency of the exported int8 model vs the fp32 model, ResNet-20-style, 2 threads.

The int8 models are QuantizationAwareTraining's exports after a short QAT run on the digits upscaled to 32×32 (so
the ranges are real) — with the default quantization of layer inputs, and with ``quantize_outputs=True`` (the
recipes' setting); the fp32 model is the same network exported without quantizers. Both run in ONNX Runtime with
all graph optimisations, 2 intra-op threads, batch 1 and batch 256, interleaved; the figure is the median latency.
The optimised graphs are inspected to report which quantized kernels ONNX Runtime actually used.

    python benchmarks/ort_latency.py          # writes the `ort_latency` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import onnx
import onnxruntime as ort
import torch
from _common import machine, update_results
from step_time import digits_32

from lightning_compress import QuantizationAwareTraining, export_onnx
from lightning_compress.quantization.prepare import detach, quantized_layers
from lightning_compress.tasks import ClassificationModule, ResNet20


def session(path: Path, optimized: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def qat_module(width: int, loader, quantize_outputs: bool) -> ClassificationModule:
    pl.seed_everything(0)
    module = ClassificationModule(ResNet20((3, 32, 32), 10, width=width), optimizer="sgd", lr=0.05)
    qat = QuantizationAwareTraining(calibration_steps=3, freeze_bn_epoch=1, quantize_outputs=quantize_outputs)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[qat],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    return module


def kernel_summary(path: Path) -> str:
    kernels = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    integer = sum(v for k, v in kernels.items() if k.startswith(("QLinear", "QGemm", "ConvInteger", "MatMulInteger")))
    floating = kernels.get("Conv", 0) + kernels.get("FusedConv", 0) + kernels.get("Gemm", 0)
    listed = ", ".join(f"{k} {v}" for k, v in sorted(kernels.items()) if k.startswith("Q"))
    return f"{integer} integer ({listed}), {floating} float"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    loader = digits_32(128)
    variants = {"int8, inputs quantized (default)": False, "int8, quantize_outputs=True": True}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {}
        for i, (kind, outputs) in enumerate(variants.items()):
            module = qat_module(args.width, loader, outputs)
            paths[kind] = export_onnx(module, tmp / f"int8-{i}.onnx", torch.zeros(1, 3, 32, 32))
        float_net = copy.deepcopy(module.net).eval()
        for layer in quantized_layers(float_net).values():
            detach(layer)
        paths["fp32"] = tmp / "fp32.onnx"
        torch.onnx.export(float_net, (torch.zeros(1, 3, 32, 32),), paths["fp32"], dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))  # fmt: skip
        sessions = {k: session(p, tmp / f"{p.stem}.opt.onnx", args.threads) for k, p in paths.items()}
        kernels = {k: kernel_summary(tmp / f"{p.stem}.opt.onnx") for k, p in paths.items()}
        results: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
        for _ in range(args.rounds):
            for batch, repeats in ((1, 100), (256, 3)):
                x = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)
                for kind, sess in sessions.items():
                    name = sess.get_inputs()[0].name
                    sess.run(None, {name: x})
                    for _ in range(repeats):
                        start = time.perf_counter()
                        sess.run(None, {name: x})
                        results[kind, batch].append(time.perf_counter() - start)
    rows, speedups = [], {}
    for kind in ("fp32", *variants):
        b1, b256 = (statistics.median(results[kind, b]) for b in (1, 256))
        s1, s256 = (statistics.median(results["fp32", b]) / statistics.median(results[kind, b]) for b in (1, 256))
        speedups[kind] = s256
        rows.append(f"| {kind} | {b1 * 1e3:.2f} ({s1:.2f}×) | {b256 * 1e3:.1f} ({s256:.2f}×) | {kernels[kind]} |")
        print(rows[-1])
    best = max(speedups[k] for k in variants)
    body = f"""## ONNX Runtime latency: int8 export vs fp32

`python benchmarks/ort_latency.py` — ResNet-20-style (width {args.width}), 32×32 inputs,
onnxruntime {ort.__version__}, all graph optimisations, {args.threads} intra-op threads; median latency over
{args.rounds} interleaved rounds, speed-up over fp32 in brackets; the kernels are those of ONNX Runtime's optimised
graph (convolutions and Gemm run as integer or float kernels). Goal: ≥ 1.5× at batch 256 — best measured
{best:.2f}×, {"met" if best >= 1.5 else "missed"}.
Machine: {machine()}.

| model | batch 1 (ms) | batch 256 (ms) | kernels |
|---|---:|---:|---|
""" + "\n".join(rows)
    update_results("ort_latency", body)


if __name__ == "__main__":
    main()
