"""Weight clustering against float and against int8, on digits (small CNN) and MNIST-1D (the paper's CNN), 3 seeds.

Every run goes through the app's own `train` on the composed config (test accuracy, compact artifact `model.lcz` and
its size ratio to fp32, ONNX parity where quantized), side by side on the same splits:

* digits: `dense`; `digits_cluster16` (20 dense epochs, 16 clusters per layer, centroids fine-tuned 10 epochs);
  `digits_deep_compression_clustered` (pruning to 90 %, then 16 clusters, distilling teacher) against its int8
  counterpart `digits_deep_compression` (pruning to 90 %, then int8 QAT, the same teacher).
* MNIST-1D: `mnist1d_dense`; the same with 16 clusters from epoch 20; pruning to 90 % (ramp 0-20) then 16 clusters;
  pruning to 90 % then int8 QAT (no teacher on MNIST-1D: no recipe has one).

Goals (issue 13): 16 clusters within 0.3 points of float; 90 % + 16 clusters ≥ 35× smaller than fp32 within 1 point of
dense; in one table with 90 % + int8. A difference is called beyond noise when Welch's t-test gives p < 0.05.

    python benchmarks/clustering.py       # writes the `clustering` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from pathlib import Path

import torch
from _common import app_run, machine, mean_std, update_results
from mnist1d_accuracy import verdict

CLUSTER = ["+compression@compression.clustering=weight_clustering", "compression.clustering.clusters=16"]
MNIST1D_PRUNE90 = ["recipe=mnist1d_prune70", "compression.pruning.final_sparsity=0.9"]
#: name → overrides of each variant.
VARIANTS: dict[str, dict[str, list[str]]] = {
    "digits": {
        "dense": ["recipe=dense"],
        "16 clusters": ["recipe=digits_cluster16"],
        "90 % + 16 clusters (KD)": ["recipe=digits_deep_compression_clustered"],
        "90 % + int8 QAT (KD)": ["recipe=digits_deep_compression"],
    },
    "MNIST-1D": {
        "dense": ["recipe=mnist1d_dense"],
        "16 clusters": ["recipe=mnist1d_dense", *CLUSTER, "compression.clustering.start_epoch=20"],
        "90 % + 16 clusters": [*MNIST1D_PRUNE90, *CLUSTER],
        "90 % + int8 QAT": [
            *MNIST1D_PRUNE90,
            "+compression@compression.quantization=quantization_aware_training",
            "compression.quantization.quantize_outputs=true",
            "compression.quantization.freeze_bn_epoch=25",
            "compression.quantization.freeze_observers_epoch=27",
        ],  # fmt: skip
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="lc-cluster-"))
    results: dict[str, dict[str, list[dict]]] = {t: {v: [] for v in variants} for t, variants in VARIANTS.items()}
    for seed in range(args.seeds):  # seeds outermost: an interrupted run still has every variant side by side
        for task, variants in VARIANTS.items():
            for name, overrides in variants.items():
                report = app_run(
                    [*overrides, f"seed={seed}"], work / re.sub(r"[^A-Za-z0-9]+", "_", f"{task}-{name}-{seed}")
                )
                results[task][name].append(report)
                print(task, name, seed, round(100 * report["accuracy"], 2), round(report["compression_ratio"], 1),
                      flush=True)  # fmt: skip

    lines = []
    for task, variants in results.items():
        dense = [100 * r["accuracy"] for r in variants["dense"]]
        for name, reports in variants.items():
            acc = [100 * r["accuracy"] for r in reports]
            ratios = [r["compression_ratio"] for r in reports]
            parity = [r["onnx_parity"]["top1_agreement"] for r in reports if r.get("onnx_parity")]
            shown = f"{100 * min(parity):.2f} %" if parity else "—"
            lines.append(
                f"| {task} | {name} | {mean_std(acc)} | {'—' if name == 'dense' else verdict(acc, dense)} | "
                f"{min(ratios):.1f}–{max(ratios):.1f}× | "
                f"{shown} |"
            )

    def goal(task: str) -> str:
        v = results[task]
        dense = statistics.mean(100 * r["accuracy"] for r in v["dense"])
        c16 = statistics.mean(100 * r["accuracy"] for r in v["16 clusters"])
        key = next(k for k in v if k.startswith("90 % + 16"))
        pc = v[key]
        gap = dense - statistics.mean(100 * r["accuracy"] for r in pc)
        worst = min(r["compression_ratio"] for r in pc)
        return (
            f"- {task}: 16 clusters {c16 - dense:+.2f} points vs float (goal within 0.3: "
            f"{'met' if dense - c16 <= 0.3 else 'missed'}); 90 % + 16 clusters {-gap:+.2f} points at ≥ {worst:.1f}× "
            f"(goal ≥ 35× within 1 point: {'met' if worst >= 35 and gap <= 1 else 'missed'})."
        )

    body = f"""
## Weight clustering: 16 clusters vs float, 90 % + 16 clusters vs 90 % + int8

`python benchmarks/clustering.py` — {args.seeds} seeds (0…{args.seeds - 1}), each variant through the app's `train`
(test split; ratio = fp32 state dict / the artifact's deploy form `model.deploy.lcz`, the app's
`compression_ratio`). {machine()}.

| task | variant | test accuracy (%) | vs dense | artifact vs fp32 | ONNX parity |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(lines)}

{goal("digits")}
{goal("MNIST-1D")}
- The artifact stores a clustered layer as a bitmask of its non-zeros, 4-bit indices and a 16-value codebook. Its
  deploy form stores each BatchNorm after a clustered convolution as a per-channel scale and shift (two vectors instead
  of four statistics and the convolution's bias; folding it into the weights would give every output channel its own
  values and undo the codebook) and folds the others into their convolution; the int8 export folds them all.
"""
    update_results("clustering", body)
    print(body)


if __name__ == "__main__":
    main()
