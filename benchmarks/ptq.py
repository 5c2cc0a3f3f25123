"""Post-training quantization against ONNX Runtime's own ``quantize_static`` and NNCF, and QAT against PTQ.

For each task (digits: the small CNN; MNIST-1D: the paper's CNN; ``resnet18``: torchvision's resnet18 on digits with the
usual small-input stem, 12 epochs, QAT from epoch 6) and seed, one float model is trained (the recipe ``dense`` /
``mnist1d_dense``, 30 epochs) and quantized after training by three tools on the same calibration batches
(the first 8 training batches, 512 samples):

* ours: :func:`lightning_compress.quantize_` (ranges observed in evaluation mode, running min/max), exported by
  ``export_onnx``;
* ONNX Runtime's ``quantize_static`` of the float model's ONNX file (after ORT's ``quant_pre_process``; QDQ,
  per-channel weights, MinMax calibration, activations uint8 — the settings closest to ours);
* NNCF's ``nncf.quantize`` (default preset) — its PyTorch backend fails on torch 2.13 ("Module [HookStorage] is
  missing the required forward function", as on 2.14), so its ONNX backend quantizes the same float ONNX file.

At 4-bit weights (activations 8 bits) ours against ``quantize_static`` with ``QInt4`` weights (NNCF's 4-bit mode is
weight compression for language models, not static quantization of convolutions: not run). Next to them, QAT with the
same seed (recipes ``*_qat_int8`` and ``*_qat_w4``). Every accuracy is that of the ONNX file in ONNX Runtime on the
test split.

    python benchmarks/ptq.py          # writes the `ptq` section of benchmarks/RESULTS.md (about 8 minutes)
    python benchmarks/ptq.py --tasks resnet18 --no-qat   # torchvision's resnet18 (needs torchvision): `ptq_resnet18`
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from _common import machine, mean_std, update_results

from lightning_compress import QATConfig, export_onnx, quantize_
from lightning_compress.apps.config import compose, instantiate
from lightning_compress.export.onnx import export_float_onnx

RECIPES = {
    "digits": {"float": "dense", "qat8": "digits_qat_int8", "qat4": "digits_qat_w4"},
    "mnist1d": {"float": "mnist1d_dense", "qat8": "mnist1d_qat_int8", "qat4": "mnist1d_qat_w4"},
}
#: A model this project did not write: torchvision's resnet18 (its BasicBlocks, `out += identity`, one ReLU module
#: called twice) with the usual small-input stem (3×3 stride-1 first convolution, no max-pool), on digits.
ZOO = {"resnet18": 12}  # task → epochs
ZOO_QAT = {"start_epoch": 6, "freeze_bn_epoch": 10, "freeze_observers_epoch": 11}
CALIBRATION_BATCHES = 8
KINDS = ["float", "ours W8A8", "quantize_static W8A8", "nncf W8A8", "QAT W8A8", "ours W4A8", "quantize_static W4A8",
         "QAT W4A8"]  # fmt: skip


def ort_accuracy(path: Path, loader) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = total = 0
    for x, y in loader:
        logits = session.run(None, {name: x.numpy()})[0]
        correct += int((logits.argmax(1) == y.numpy()).sum())
        total += len(y)
    return 100 * correct / total


def zoo_net() -> torch.nn.Module:
    from torchvision.models import resnet18

    net = resnet18(num_classes=10)
    net.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    return net


def train_zoo(kind: str, seed: int, out: Path):
    from lightning_compress import QuantizationAwareTraining
    from lightning_compress.tasks import ClassificationModule, DigitsDataModule

    pl.seed_everything(seed)
    dm = DigitsDataModule(seed=seed)
    module = ClassificationModule(zoo_net(), lr=1e-3)
    callbacks = [] if kind == "float" else [QuantizationAwareTraining(weight_bits=int(kind[3:]), **ZOO_QAT)]
    trainer = pl.Trainer(max_epochs=ZOO["resnet18"], callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=out, accelerator="cpu")  # fmt: skip
    trainer.fit(module, datamodule=dm)
    dm.setup()
    return module, dm


def train(task: str, kind: str, seed: int, out: Path):
    if task in ZOO:
        return train_zoo(kind, seed, out)
    cfg = compose([f"recipe={RECIPES[task][kind]}", "logger=none", "callbacks=none", f"paths.output_dir={out}"])
    pl.seed_everything(seed)
    dm = instantiate(cfg.data)
    net = instantiate(cfg.model, input_shape=dm.input_shape, num_classes=dm.num_classes)
    callbacks = [instantiate(c) for c in cfg.compression.values()]
    module = instantiate(cfg.module, net=net, num_classes=dm.num_classes)
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    trainer.fit(module, datamodule=dm)
    dm.setup()
    return module, dm


class Reader:
    """ONNX Runtime's calibration reader over the shared calibration batches."""

    def __init__(self, name: str, batches: list[torch.Tensor]) -> None:
        self.items = iter([{name: x.numpy()} for x in batches])

    def get_next(self):
        return next(self.items, None)


def ort_static(float_path: Path, out: Path, batches: list[torch.Tensor], weight_bits: int) -> Path:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out / "float.pre.onnx"
    quant_pre_process(str(float_path), str(pre))
    name = onnx.load(str(pre)).graph.input[0].name
    reader = type("R", (Reader, CalibrationDataReader), {})(name, batches)
    path = out / f"ort_w{weight_bits}.onnx"
    quantize_static(
        str(pre), str(path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8 if weight_bits == 8 else QuantType.QInt4,
    )  # fmt: skip
    return path


def nncf_quantize(float_path: Path, out: Path, batches: list[torch.Tensor]) -> Path:
    import nncf
    import onnx

    model = onnx.load(str(float_path))
    name = model.graph.input[0].name
    dataset = nncf.Dataset(batches, lambda x: {name: x.numpy()})
    quantized = nncf.quantize(model, dataset, subset_size=len(batches))  # every calibration batch
    path = out / "nncf.onnx"
    onnx.save(quantized, str(path))
    return path


def run(task: str, seed: int, tmp: Path, qat: bool = True) -> dict[str, float]:
    out = tmp / f"{task}-{seed}"
    out.mkdir()
    module, dm = train(task, "float", seed, out)
    net = module.net.eval()
    test = dm.test_dataloader()
    batches = [x for _, (x, _) in zip(range(CALIBRATION_BATCHES), dm.train_dataloader(), strict=False)]
    example = next(iter(test))[0]
    float_path = export_float_onnx(net, out / "float.onnx", example)
    result = {"float": ort_accuracy(float_path, test)}
    for bits in (8, 4):
        ours = copy.deepcopy(net)
        quantize_(ours, QATConfig(weight_bits=bits), batches)
        result[f"ours W{bits}A8"] = ort_accuracy(export_onnx(ours.eval(), out / f"ours_w{bits}.onnx", example), test)
        result[f"quantize_static W{bits}A8"] = ort_accuracy(ort_static(float_path, out, batches, bits), test)
    result["nncf W8A8"] = ort_accuracy(nncf_quantize(float_path, out, batches), test)
    for bits in (8, 4) if qat else ():
        model, _ = train(task, f"qat{bits}", seed, out / f"qat{bits}")
        result[f"QAT W{bits}A8"] = ort_accuracy(export_onnx(model, out / f"qat_w{bits}.onnx", example), test)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=list(RECIPES), help=f"of {[*RECIPES, *ZOO]}")
    parser.add_argument(
        "--no-qat", action="store_true", help="post-training rows only (QAT trains the model twice more)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    results: dict[str, dict[str, list[float]]] = {t: {k: [] for k in KINDS} for t in args.tasks}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            for seed in range(args.seeds):
                for kind, value in run(task, seed, Path(tmp), qat=not args.no_qat).items():
                    results[task][kind].append(value)
                print(task, seed, {k: v[-1] for k, v in results[task].items() if v}, flush=True)
    lines = [
        "## Post-training quantization (`benchmarks/ptq.py`)"
        + ("" if set(args.tasks) <= set(RECIPES) else f" on {', '.join(args.tasks)} (torchvision)"),
        "",
        f"Test accuracy (%) of each ONNX file in ONNX Runtime, mean ± std over {args.seeds} seeds (one float model per "
        f"seed, quantized by each tool on the same {CALIBRATION_BATCHES} calibration batches; QAT trained from scratch "
        f"with the same seed). Δ is against the float model; 'vs ORT' is the mean of the per-seed differences to "
        "ONNX Runtime's `quantize_static` at the same bits. Machine: " + machine() + ".",
        "",
    ]
    for task in args.tasks:
        r = results[task]
        lines += [f"**{task}**", "", "| model | accuracy | Δ float | vs ORT quantize_static |", "|---|---|---|---|"]
        for kind in [k for k in KINDS if r[k]]:
            delta = statistics.mean(np.subtract(r[kind], r["float"]))
            bits = "W4A8" if "W4" in kind else "W8A8"
            peer = r[f"quantize_static {bits}"]
            vs = (
                "—"
                if kind in ("float", f"quantize_static {bits}")
                else f"{statistics.mean(np.subtract(r[kind], peer)):+.2f}"
            )
            lines.append(f"| {kind} | {mean_std(r[kind])} | {delta:+.2f} | {vs} |")
        lines.append("")
    # one section per set of tasks: the zoo model (another environment: torchvision needs torch 2.14) keeps its own
    update_results("ptq" if set(args.tasks) <= set(RECIPES) else "ptq_" + "_".join(args.tasks), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
