"""Quantized accuracy on digits, measured on the exported int8 model in ONNX Runtime, and artifact sizes.

For each of 3 training seeds: the float model (recipe `dense`), QAT to int8 (recipe `digits_qat_int8`), 4-bit
weights (recipe `digits_qat_w4`), 2-bit weights with learned step sizes (LSQ; first and last layer at 8 bits), and
torch.ao's eager QAT converted to a real int8 PyTorch model (x86 backend) as the peer, driven through the same
phases (fake quantization from epoch 10, BatchNorm frozen at 25, observers at 27 of 30). Our quantized accuracies
are those of the ONNX file run in ONNX Runtime. Then the compact artifact (``model.lcz``) of fp32, int8 and
90 %-pruned + int8 models next to the storage bound H(s) + (1 − s)·b bits per weight.

    python benchmarks/qat_accuracy.py          # writes the `qat_accuracy` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from _common import machine, mean_std, update_results
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_compress import MagnitudePruning, QuantizationAwareTraining, export_onnx, onnx_parity
from lightning_compress.analysis.artifact import fp32_size_bytes, save_compressed
from lightning_compress.apps.config import compose, instantiate
from lightning_compress.core.metrics import evaluate_accuracy
from lightning_compress.quantization.prepare import quantized_layers

PHASES = {"start_epoch": 10, "freeze_bn_epoch": 25, "freeze_observers_epoch": 27}


class EagerPeer(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.net, self.dequant = QuantStub(), net, DeQuantStub()

    def forward(self, x):
        return self.dequant(self.net(self.quant(x)))


def eager_peer(net: nn.Module) -> nn.Module:
    from torch.ao.quantization import fuse_modules_qat, get_default_qat_qconfig, prepare_qat

    net.train()
    fuse_modules_qat(
        net,
        [["features.0", "features.1", "features.2"], ["features.3", "features.4", "features.5"],
         ["features.7", "features.8", "features.9"], ["classifier.1", "classifier.2"]],
        inplace=True,
    )  # fmt: skip
    model = EagerPeer(net)
    model.qconfig = get_default_qat_qconfig("x86")
    prepare_qat(model, inplace=True)
    return model


class EagerPhases(Callback):
    """torch.ao's switches at the same epochs as our recipes."""

    def on_train_epoch_start(self, trainer, pl_module):
        import torch.ao.nn.intrinsic.qat as nniqat
        from torch.ao.quantization import disable_fake_quant, disable_observer, enable_fake_quant, enable_observer

        e = trainer.current_epoch
        pl_module.apply(enable_fake_quant if e >= PHASES["start_epoch"] else disable_fake_quant)
        pl_module.apply(
            enable_observer if PHASES["start_epoch"] - 1 <= e < PHASES["freeze_observers_epoch"] else disable_observer
        )
        if e >= PHASES["freeze_bn_epoch"]:
            pl_module.apply(nniqat.freeze_bn_stats)


def accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy in percent, from the package's one metric source (torchmetrics)."""
    model.eval()
    return 100 * evaluate_accuracy(model, loader, "the test loader")


#: The recipe of each kind, per task (w2-lsq: the w4 recipe with 2-bit weights and learned step sizes).
RECIPES = {
    "digits": {"float": "dense", "int8": "digits_qat_int8", "w4": "digits_qat_w4", "w2-lsq": "digits_qat_w4"},
    "mnist1d": {
        "float": "mnist1d_dense",
        "int8": "mnist1d_qat_int8",
        "w4": "mnist1d_qat_w4",
        "w2-lsq": "mnist1d_qat_w4",
    },  # fmt: skip
}


def run(seed: int, kind: str, epochs: int, out: Path, task: str = "digits") -> dict[str, float]:
    recipe = RECIPES[task].get(kind, RECIPES[task]["float"])
    overrides = [
        f"recipe={recipe}",
        "logger=none",
        "callbacks=none",
        f"paths.output_dir={out}",
        f"trainer.max_epochs={epochs}",
    ]
    if kind == "w2-lsq":
        overrides += ["compression.quantization.weight_bits=2", "compression.quantization.observer=lsq"]
    cfg = compose(overrides)
    pl.seed_everything(seed)
    dm = instantiate(cfg.data)
    net = instantiate(cfg.model, input_shape=dm.input_shape, num_classes=dm.num_classes)
    callbacks: list[pl.Callback] = [instantiate(c) for c in cfg.compression.values()]
    if kind == "torch.ao eager":
        net, callbacks = eager_peer(net), [EagerPhases()]
    if kind == "90% + int8":
        callbacks = [MagnitudePruning(final_sparsity=0.9, end_epoch=10), QuantizationAwareTraining(**PHASES)]
    module = instantiate(cfg.module, net=net, num_classes=dm.num_classes)
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    trainer.fit(module, datamodule=dm)
    dm.setup()
    loader = dm.test_dataloader()
    result: dict[str, float] = {}
    if kind == "torch.ao eager":
        from torch.ao.quantization import convert

        int8 = convert(module.net.eval(), inplace=False)
        result["accuracy"] = accuracy(int8, loader)
    elif quantized_layers(module):
        path = export_onnx(module, out / "model.onnx", next(iter(loader))[0])
        parity = onnx_parity(module, path, loader)
        result.update(accuracy=100 * parity["accuracy_onnx"], agreement=100 * parity["top1_agreement"])
        result["onnx_bytes"] = path.stat().st_size
    else:
        result["accuracy"] = accuracy(module, loader)
    result["artifact_bytes"] = save_compressed(module, out / "model.lcz", deploy=True)  # the smallest file
    result["fp32_bytes"] = fp32_size_bytes({k: v for k, v in module.state_dict().items() if "_quantizer." not in k})
    layers = quantized_layers(module)
    if layers:
        # H(s) + (1 - s)·b bits per weight: n·H(s) for where the zeros are, b_l bits for each non-zero of layer l.
        total = sum(m.weight.numel() for m in layers.values())
        nonzero_bits = sum(int(torch.count_nonzero(m.weight)) * m.weight_quantizer.spec.bits for m in layers.values())
        s = 1 - sum(int(torch.count_nonzero(m.weight)) for m in layers.values()) / total
        h = 0.0 if s in (0.0, 1.0) else -(s * math.log2(s) + (1 - s) * math.log2(1 - s))
        others = result["fp32_bytes"] - 4 * total  # biases and BatchNorm parameters, counted as fp32
        result["bound_bytes"] = (total * h + nonzero_bits) / 8 + others
        result["sparsity"] = s
    return result


def run_all(seeds: int, kinds: list[str], epochs: int, task: str = "digits") -> dict[str, list[dict[str, float]]]:
    """:func:`run` for every seed and kind (seeds outermost), each in its own temporary directory."""
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            for kind in kinds:
                out = Path(tmp) / f"{kind}-{seed}".replace(" ", "_").replace("%", "")
                out.mkdir()
                results[kind].append(run(seed, kind, epochs, out, task))
                print(seed, kind, results[kind][-1], flush=True)
    return results


def agreement_cell(runs: list[dict[str, float]]) -> str:
    """The lowest top-1 agreement (%) over the runs that exported, or a dash."""
    agreement = [r["agreement"] for r in runs if "agreement" in r]
    return f"{min(agreement):.2f}" if agreement else "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
    kinds = ["float", "int8", "w4", "w2-lsq", "torch.ao eager", "90% + int8"]
    results = run_all(args.seeds, kinds, args.epochs)

    def acc(kind):
        return [r["accuracy"] for r in results[kind]]

    float_mean = statistics.mean(acc("float"))
    rows = []
    for kind in kinds:
        rows.append(
            f"| {kind} | {mean_std(acc(kind))} | {statistics.mean(acc(kind)) - float_mean:+.2f} | "
            f"{agreement_cell(results[kind])} |"
        )
    size_rows = []
    for kind in ("float", "int8", "w4", "90% + int8"):
        r = results[kind][0]
        fp32, art = r["fp32_bytes"], r["artifact_bytes"]
        bound = r.get("bound_bytes")
        size_rows.append(
            f"| {kind} | {fp32 / 1024:.1f} | {art / 1024:.1f} | {fp32 / art:.1f}× | "
            + (f"{bound / 1024:.1f} | {art / bound:.2f}× |" if bound else "— | — |")
            + (f" {r['onnx_bytes'] / 1024:.1f} |" if "onnx_bytes" in r else " — |")
        )
    int8_gap = statistics.mean(acc("int8")) - float_mean
    w4_gap = statistics.mean(acc("w4")) - float_mean
    beats_peer = statistics.mean(acc("int8")) >= statistics.mean(acc("torch.ao eager"))
    deep = results["90% + int8"][0]
    deep_ratio, deep_vs_bound = (
        deep["fp32_bytes"] / deep["artifact_bytes"],
        deep["artifact_bytes"] / deep["bound_bytes"],
    )
    deep_verdict = "met" if deep_ratio >= 22 and deep_vs_bound <= 1.15 else "missed"
    body = (
        f"""## Quantized accuracy on digits (ONNX Runtime) and artifact sizes

`python benchmarks/qat_accuracy.py` — small CNN on digits (same held-out 360 test images for every run), 30 epochs,
seeds 0–{args.seeds - 1}; test accuracy (%) mean ± std. Quantized rows are the exported ONNX model run in ONNX
Runtime (the `agreement` column: the lowest top-1 agreement with the fake-quantized PyTorch model over the
seeds). int8 = recipe `digits_qat_int8`; w4 = recipe `digits_qat_w4` (4-bit weights, first/last layer 8-bit,
8-bit activations); w2-lsq = the same with 2-bit weights and learned step sizes; torch.ao eager = Conv+BN+ReLU
fusion, x86 default QAT qconfig, `convert` to an int8 PyTorch model, same phase epochs; 90 % + int8 =
MagnitudePruning to 90 % over epochs 0–10, then int8 QAT.
Machine: {machine()}.

| model | accuracy | vs float | agreement (%) |
|---|---:|---:|---:|
"""
        + "\n".join(rows)
        + f"""

Goals: int8 within 0.3 points of float — {int8_gap:+.2f}, {"met" if int8_gap >= -0.3 else "missed"}; int8 at least
torch.ao's — {"met" if beats_peer else "missed"}; 4-bit weights within 1 point — {w4_gap:+.2f},
{"met" if w4_gap >= -1 else "missed"}.

Compact artifact in its deploy form (`save_compressed(model, path, deploy=True)`: bitmask of non-zeros + non-zero
values, integers for quantized layers, BatchNorm folded, lzma), seed 0.
The bound is H(s) + (1 − s)·b bits per quantized weight plus the other tensors (biases, BatchNorm, scales) at fp32.
Goal: 90 % + int8 ≥ 22× smaller than fp32 and within 1.15× of the bound — {deep_ratio:.1f}× and
{deep_vs_bound:.2f}× the bound, {deep_verdict}. (lzma codes the non-zero integers in fewer than b bits where their
distribution is peaked, so an artifact can come in under this bound.)

| model | fp32 (KiB) | artifact (KiB) | ratio | bound (KiB) | artifact / bound | ONNX file (KiB) |
|---|---:|---:|---:|---:|---:|---:|
"""
        + "\n".join(size_rows)
    )
    update_results("qat_accuracy", body)


if __name__ == "__main__":
    main()
