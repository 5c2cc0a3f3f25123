"""The combined recipe for the ResNet-20-style network: channel groups + int8 QAT + distillation, through the app.

`lightning-compress recipe=digits_resnet20_channel_qat_kd seed=S` (half of the channels removed by dependency group
over epochs 0-12, int8 QAT from epoch 15, a dense ResNet-20 teacher distilling; 30 epochs) against the dense network
(`recipe=dense model=resnet20`), 3 seeds, digits (8×8). Reported per variant: test accuracy of the trained model, of
its int8 ONNX file and of the compact int8 ONNX file (channels cut out, quantizers kept) in ONNX Runtime, the compact
network's parameters and FLOPs, and how far the compact network is from the trained one (float, largest absolute
logit difference on the test split; quantized, top-1 agreement). The ONNX Runtime speed of such networks is measured
side by side in `ort_latency.py` (32×32 inputs, where the convolutions dominate).

    python benchmarks/resnet_recipe.py    # writes the `resnet_recipe` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import app_run, machine, mean_std, update_results
from mnist1d_accuracy import verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    variants = {"dense": ["recipe=dense", "model=resnet20"], "recipe": ["recipe=digits_resnet20_channel_qat_kd"]}
    reports: dict[str, list[dict]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for name, overrides in variants.items():
                report = app_run([*overrides, f"seed={seed}", "latency=null"], Path(tmp) / f"{name}-{seed}")
                reports[name].append(report)
                print(name, seed, {k: report.get(k) for k in ("accuracy", "accuracy_onnx", "compact")}, flush=True)
    dense = [100 * r["accuracy"] for r in reports["dense"]]
    recipe = reports["recipe"]
    trained = [100 * r["accuracy"] for r in recipe]
    onnx = [100 * r["accuracy_onnx"] for r in recipe]
    compact_onnx = [100 * r["compact"]["onnx_parity"]["accuracy_onnx"] for r in recipe]
    flops = [reports["dense"][0]["flops_per_sample"] / r["compact"]["flops_per_sample"] for r in recipe]
    params = [r["compact"]["params"] for r in recipe]
    agreement = [100 * r["compact"]["quantized_top1_agreement"] for r in recipe]
    float_diff = [r["compact"]["max_abs_difference"] for r in recipe]
    minutes = (time.perf_counter() - start) / 60
    body = f"""## The ResNet-20 recipe: channel groups + int8 QAT + distillation

`python benchmarks/resnet_recipe.py` — `lightning-compress recipe=digits_resnet20_channel_qat_kd seed=S` against
`recipe=dense model=resnet20`, seeds 0–{args.seeds - 1}, digits (8×8), test accuracy % (mean ± std; "vs dense" by
Welch's t-test). {minutes:.0f} min. {machine()}.

| model | accuracy | vs dense |
|---|---:|---|
| dense ResNet-20 w16 ({reports["dense"][0]["params"]:,} parameters) | {mean_std(dense)} | — |
| recipe, trained (fake-quantized, full shape) | {mean_std(trained)} | {verdict(trained, dense)} |
| recipe, int8 ONNX file (full shape) | {mean_std(onnx)} | {verdict(onnx, dense)} |
| recipe, compact int8 ONNX file | {mean_std(compact_onnx)} | {verdict(compact_onnx, dense)} |

The compact network: {min(params):,}–{max(params):,} parameters, {min(flops):.2f}–{max(flops):.2f}× fewer FLOPs than
dense; against the trained model, quantizers off, largest absolute logit difference on the test split
{max(float_diff):.1e}; quantized, top-1 agreement {min(agreement):.2f} % at the lowest."""
    update_results("resnet_recipe", body)


if __name__ == "__main__":
    main()
