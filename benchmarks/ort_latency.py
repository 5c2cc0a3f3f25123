"""ONNX Runtime latency of our int8 export against fp32 and against ONNX Runtime's own static int8 of the same
model, ResNet-20-style at widths 16 and 64, 2 threads; and of the compact network, fp32 and int8.

Our int8 models are QuantizationAwareTraining's exports after a short QAT run on the digits upscaled to 32×32 (so
the ranges are real) — with the default ``quantize_outputs=True`` and with layer inputs quantized only. The compact
rows remove 32 % of the channels by dependency group first (``round_to=8``: about 2x fewer FLOPs), then
``export_compact`` cuts them out (keeping the quantizers for the int8 row, whose ONNX file ``export_onnx`` checks).
The fp32 model is the same network exported without quantizers. The peer is ONNX Runtime's own post-training static
quantization of that fp32 file (``quant_pre_process``, then ``quantize_static``: QDQ format, per-channel int8
weights, uint8 activations, calibrated on 8 batches of the same data). All run in ONNX Runtime with all graph
optimisations, 2 intra-op threads, batch 1 and batch 256, in interleaved rounds; the figure is the median over the
rounds of each round's median, with the lowest and highest round in brackets. The optimised graphs are inspected to
report which kernels ONNX Runtime actually used.

    python benchmarks/ort_latency.py          # writes the `ort_latency` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import onnx
import onnxruntime as ort
import torch
from _common import interleaved_ort_medians, machine, update_results
from step_time import digits_32

from lightning_compress import MagnitudePruning, QuantizationAwareTraining, export_compact, export_onnx
from lightning_compress.analysis.latency import ort_session
from lightning_compress.export.onnx import export_float_onnx
from lightning_compress.quantization.prepare import unprepare
from lightning_compress.tasks import ClassificationModule, ResNet20


def qat_module(width: int, loader, quantize_outputs: bool, batches: int = 8, channels: bool = False):
    """A short QAT run (2 epochs of ``batches`` batches): real ranges; the speed does not depend on convergence. With
    ``channels``, 32 % of the channels removed by dependency group in the first epoch (each group keeping a multiple
    of 8: ``round_to=8``, about 2x fewer FLOPs), QAT in the second."""
    pl.seed_everything(0)
    module = ClassificationModule(ResNet20((3, 32, 32), 10, width=width), optimizer="sgd", lr=0.05)
    callbacks: list = []
    if channels:
        callbacks.append(MagnitudePruning(final_sparsity=CHANNEL_SHARE, granularity="channel", round_to=8,
                                          end_epoch=1, exclude="@last"))  # fmt: skip
    callbacks.append(QuantizationAwareTraining(calibration_steps=3, start_epoch=1 if channels else None,
                                               freeze_bn_epoch=1, quantize_outputs=quantize_outputs))  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, limit_train_batches=batches, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    return module


def kernel_summary(path: Path) -> str:
    kernels = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    integer_kinds = ("QLinear", "QGemm", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "QAttention")
    integer = sum(v for k, v in kernels.items() if k.startswith(integer_kinds))
    floating = sum(kernels.get(k, 0) for k in ("Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul"))
    listed = ", ".join(f"{k} {v}" for k, v in sorted(kernels.items()) if k.startswith(("Q", *integer_kinds[2:])))
    return f"{integer} integer ({listed}), {floating} float"


def ort_static_int8(fp32: Path, out: Path, loader, batches: int = 8) -> Path:
    """ONNX Runtime's own static quantization of ``fp32``: pre-processing, QDQ, per-channel int8 weights, uint8
    activations, calibrated on ``batches`` batches of ``loader``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnx.load(fp32).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: x.numpy()} for (x, _), _ in zip(loader, range(batches), strict=False)])

        def get_next(self):
            return next(self.batches, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)  # fmt: skip
    return out


def models(width: int, loader, tmp: Path) -> dict[str, Path]:
    """fp32, ONNX Runtime's static int8 of it, our two int8 exports, and the compact network (fp32 and int8), for one
    width."""
    paths = {}
    x = torch.zeros(1, 3, 32, 32)
    pruned = qat_module(width, loader, True, channels=True)
    compact = export_compact(pruned.net, next(iter(loader))[0][:8])
    paths[COMPACT_INT8] = export_onnx(compact, tmp / f"w{width}-compact-int8.onnx", x)
    compact_float = copy.deepcopy(compact)
    unprepare(compact_float)
    paths[COMPACT_FP32] = export_float_onnx(compact_float, tmp / f"w{width}-compact-fp32.onnx", x)
    for i, (kind, outputs) in enumerate(OURS.items()):
        module = qat_module(width, loader, outputs)
        paths[kind] = export_onnx(module, tmp / f"w{width}-int8-{i}.onnx", x)
    float_net = copy.deepcopy(module.net).eval()
    unprepare(float_net)
    paths["fp32"] = tmp / f"w{width}-fp32.onnx"
    torch.onnx.export(float_net, (torch.zeros(1, 3, 32, 32),), paths["fp32"], dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))  # fmt: skip
    paths[PEER] = ort_static_int8(paths["fp32"], tmp / f"w{width}-ort-static.onnx", loader)
    return {k: paths[k] for k in ("fp32", PEER, *OURS, COMPACT_FP32, COMPACT_INT8)}


OURS = {"ours: int8 (default: quantize_outputs=True)": True, "ours: int8, inputs only (quantize_outputs=False)": False}
PEER = "ONNX Runtime quantize_static (peer)"
CHANNEL_SHARE = 0.32
COMPACT_FP32 = f"ours: compact ({CHANNEL_SHARE:.0%} of channels by group, round_to=8), fp32"
COMPACT_INT8 = f"ours: compact ({CHANNEL_SHARE:.0%} of channels by group, round_to=8) + int8"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    loader = digits_32(128)
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for width in args.widths:
            paths = models(width, loader, tmp)
            sessions = {k: ort_session(p, args.threads, tmp / f"{p.stem}.opt.onnx") for k, p in paths.items()}
            kernels = {k: kernel_summary(tmp / f"{p.stem}.opt.onnx") for k, p in paths.items()}
            rounds = interleaved_ort_medians(sessions, args.rounds, (3, 32, 32))
            rows = []
            for kind in paths:
                cells = []
                for batch in (1, 256):
                    ours = rounds[kind, batch]
                    speedups = [f / o for f, o in zip(rounds["fp32", batch], ours, strict=True)]
                    scale = 1e3
                    cells.append(
                        f"{statistics.median(ours) * scale:.{2 if batch == 1 else 1}f} | "
                        f"{statistics.median(speedups):.2f}× ({min(speedups):.2f}–{max(speedups):.2f})"
                    )
                rows.append(f"| {kind} | {cells[0]} | {cells[1]} | {kernels[kind]} |")
                print(width, rows[-1], flush=True)
            sections.append(
                f"""### Width {width}

| model | batch 1 (ms) | vs fp32 | batch 256 (ms) | vs fp32 | kernels in ONNX Runtime's optimised graph |
|---|---:|---:|---:|---:|---|
"""
                + "\n".join(rows)
            )
    body = f"""## ONNX Runtime latency: our int8 export vs fp32 and vs ONNX Runtime's own static int8

`python benchmarks/ort_latency.py` — ResNet-20-style, 32×32 inputs, onnxruntime {ort.__version__}, all graph
optimisations, {args.threads} intra-op threads; {args.rounds} interleaved rounds: the median over the rounds of each
round's median call time, and the speed-up over fp32 (median, lowest–highest round in brackets). The peer is ONNX
Runtime's own `quant_pre_process` + `quantize_static` (QDQ, per-channel int8 weights, uint8 activations) of the same
fp32 file. Machine: {machine()}.

""" + "\n\n".join(sections)
    update_results("ort_latency", body)


if __name__ == "__main__":
    main()
