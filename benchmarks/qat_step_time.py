"""Step time of QuantizationAwareTraining vs plain training vs torch.ao eager QAT, in one process.

ResNet-20-style (width 16) on 32×32 inputs (digits upscaled, 3 channels), batch 128, SGD. The three set-ups run
interleaved; the figure is the median step (every hook included) over all repetitions. torch.ao's eager QAT is the
deprecated peer most users compare with: the model gets QuantStub/DeQuantStub, Conv+BN+ReLU fusion and
``prepare_qat`` (this script only measures it; the package never uses that API).

    python benchmarks/qat_step_time.py        # writes the `qat_step_time` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import lightning.pytorch as pl
import torch
from _common import machine, timed_fit, update_results
from step_time import digits_32
from torch import nn

from lightning_compress import QuantizationAwareTraining
from lightning_compress.tasks import ClassificationModule, ResNet20

KINDS = ("plain", "QuantizationAwareTraining", "torch.ao eager QAT")


class EagerQATNet(nn.Module):
    """ResNet-20 prepared for torch.ao eager-mode QAT (stubs, fused Conv+BN(+ReLU), FloatFunctional adds)."""

    def __init__(self, net: ResNet20) -> None:
        super().__init__()
        import torch.ao.nn.quantized as nnq
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.dequant, self.net = QuantStub(), DeQuantStub(), net
        for block in net.modules():
            if type(block).__name__ == "BasicBlock":
                block.add = nnq.FloatFunctional()
                block.forward = self._block_forward(block)

    @staticmethod
    def _block_forward(block):
        def forward(x):
            return block.relu(block.add.add(block.body(x), block.shortcut(x)))

        return forward

    def forward(self, x):
        return self.dequant(self.net(self.quant(x)))


def eager_qat_module() -> ClassificationModule:
    from torch.ao.quantization import fuse_modules_qat, get_default_qat_qconfig, prepare_qat

    net = ResNet20((3, 32, 32), 10, width=16)
    pairs = []
    for name, m in net.named_modules():
        if isinstance(m, nn.Sequential):
            kids = list(m.named_children())
            for i in range(len(kids) - 1):
                a, b = kids[i], kids[i + 1]
                if (
                    isinstance(b[1], nn.Conv2d)
                    or not isinstance(a[1], nn.Conv2d)
                    or not isinstance(b[1], nn.BatchNorm2d)
                ):
                    continue
                group = [f"{name}.{a[0]}" if name else a[0], f"{name}.{b[0]}" if name else b[0]]
                if i + 2 < len(kids) and isinstance(kids[i + 2][1], nn.ReLU):
                    group.append(f"{name}.{kids[i + 2][0]}" if name else kids[i + 2][0])
                pairs.append(group)
    net.train()
    fuse_modules_qat(net, pairs, inplace=True)
    model = EagerQATNet(net)
    model.qconfig = get_default_qat_qconfig("x86")
    prepare_qat(model, inplace=True)
    return ClassificationModule(model, optimizer="sgd", lr=0.05)


def run_once(kind: str, loader, steps: int) -> list[float]:
    pl.seed_everything(0)
    callbacks: list[pl.Callback] = []
    if kind == "torch.ao eager QAT":
        module = eager_qat_module()
    else:
        module = ClassificationModule(ResNet20((3, 32, 32), 10, width=16), optimizer="sgd", lr=0.05)
        if kind == "QuantizationAwareTraining":
            callbacks.append(QuantizationAwareTraining(calibration_steps=0))
    return timed_fit(module, loader, callbacks, steps, max_epochs=100, skip=3)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")  # the peer's deprecation notice
    loader = digits_32(args.batch_size)
    steps: dict[str, list[float]] = {k: [] for k in KINDS}
    run_once("plain", loader, 5)
    for _ in range(args.repeats):
        for kind in KINDS:
            steps[kind] += run_once(kind, loader, args.steps)
    plain = statistics.median(steps["plain"])
    rows = []
    for kind in KINDS:
        median = statistics.median(steps[kind])
        rows.append(f"| {kind} | {median * 1e3:.1f} | {median / plain:.2f}× | {len(steps[kind])} |")
        print(f"{kind:28s} median step {median * 1e3:7.1f} ms  {median / plain:.2f}× plain")
    body = f"""## Step time: QuantizationAwareTraining vs plain vs torch.ao eager QAT

`python benchmarks/qat_step_time.py` — ResNet-20-style (width 16), 32×32 inputs (digits upscaled), batch
{args.batch_size}, SGD, {args.repeats} interleaved repetitions of {args.steps} steps, median step with every hook.
QuantizationAwareTraining: int8 per-channel weights with BatchNorm folded, uint8 activations, min/max observers, fake
quantization from the first step. torch.ao eager QAT: the x86 default QAT qconfig after Conv+BN(+ReLU) fusion (the
deprecated API, measured here only as the peer). Goal: QuantizationAwareTraining ≤ 1.4× plain.
Machine: {machine()}.

| set-up | median step (ms) | vs plain | steps measured |
|---|---:|---:|---:|
""" + "\n".join(rows)
    update_results("qat_step_time", body)


if __name__ == "__main__":
    main()
