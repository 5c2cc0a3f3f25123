"""ONNX Runtime latency of the exported int8 model vs the fp32 model, ResNet-20-style, 2 threads.

The int8 model is QuantizationAwareTraining's export after a short QAT run on the digits upscaled to 32×32 (so the
ranges are real); the fp32 model is the same network exported without quantizers. Both run in ONNX Runtime with
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
from lightning_compress.quantization.attach import detach, quantized_layers
from lightning_compress.tasks import ClassificationModule, ResNet20


def session(path: Path, optimized: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    pl.seed_everything(0)
    module = ClassificationModule(ResNet20((3, 32, 32), 10, width=args.width), optimizer="sgd", lr=0.05)
    loader = digits_32(128)
    qat = QuantizationAwareTraining(calibration_steps=3, freeze_bn_epoch=1)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[qat],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        int8_path = export_onnx(module, tmp / "int8.onnx", torch.zeros(1, 3, 32, 32))
        float_net = copy.deepcopy(module.net).eval()
        for layer in quantized_layers(float_net).values():
            detach(layer)
        float_path = tmp / "fp32.onnx"
        torch.onnx.export(float_net, (torch.zeros(1, 3, 32, 32),), float_path, dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))  # fmt: skip
        sessions = {
            "fp32": session(float_path, tmp / "fp32.opt.onnx", args.threads),
            "int8": session(int8_path, tmp / "int8.opt.onnx", args.threads),
        }
        kernels = collections.Counter(n.op_type for n in onnx.load(tmp / "int8.opt.onnx").graph.node)
        fp32_kernels = collections.Counter(n.op_type for n in onnx.load(tmp / "fp32.opt.onnx").graph.node)
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
    rows = []
    speedups = {}
    for batch in (1, 256):
        fp32, int8 = statistics.median(results["fp32", batch]), statistics.median(results["int8", batch])
        speedups[batch] = fp32 / int8
        rows.append(f"| {batch} | {fp32 * 1e3:.2f} | {int8 * 1e3:.2f} | {fp32 / int8:.2f}× |")
        print(f"batch {batch}: fp32 {fp32 * 1e3:.2f} ms, int8 {int8 * 1e3:.2f} ms, {fp32 / int8:.2f}x")
    quant_ops = {
        k: v
        for k, v in kernels.items()
        if k.startswith(
            ("QLinear", "Quantize", "Dequantize", "QGemm", "ConvInteger", "MatMulInteger", "DynamicQuantize")
        )
    }
    float_convs = kernels.get("Conv", 0) + kernels.get("FusedConv", 0)
    fp32_convs = fp32_kernels.get("Conv", 0) + fp32_kernels.get("FusedConv", 0)
    print("int8 graph kernels:", dict(kernels))
    body = (
        f"""## ONNX Runtime latency: int8 export vs fp32

`python benchmarks/ort_latency.py` — ResNet-20-style (width {args.width}), 32×32 inputs,
onnxruntime {ort.__version__}, all graph optimisations, {args.threads} intra-op threads; median over {args.rounds}
interleaved rounds. Goal: ≥ 1.5× at batch 256.
Machine: {machine()}.

| batch | fp32 (ms) | int8 (ms) | speed-up |
|---|---:|---:|---:|
"""
        + "\n".join(rows)
        + f"""

Kernels in ONNX Runtime's optimised int8 graph: quantized {dict(sorted(quant_ops.items()))}; float convolutions left:
{float_convs} (the fp32 graph has {fp32_convs}). Goal at batch 256 {"met" if speedups[256] >= 1.5 else "missed"}.
"""
    )
    update_results("ort_latency", body)


if __name__ == "__main__":
    main()
