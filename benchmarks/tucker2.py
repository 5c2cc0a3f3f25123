"""Which factorization of a convolution: ours (a k×k convolution to r channels, then a 1×1 — the truncated SVD of the
filters as a matrix) or Tucker-2 (a 1×1 to r_in channels, a k×k from r_in to r_out, a 1×1 to the outputs — tensorly's
``partial_tucker`` on the input and output modes)?

Digits (8×8), the ResNet-20-style network of width 16 (`recipe=dense model=resnet20`: AdamW, 30 epochs), seeds 0…n-1.
After dense training, every 3×3 convolution of the residual blocks is factorized in one shot by each method, each layer
kept at the same share f of its FLOPs (for Tucker-2, r_in/in = r_out/out, the largest that fits), f the largest (0.01
steps) at which the whole network has at most half the dense FLOPs. Reported: the filters' relative reconstruction
error (mean over layers), test accuracy right after the cut and after 10 epochs of fine-tuning the factorized network
(same optimizer and recipe). This is the measurement behind `LowRankFactorization`'s choice of form; the callback's
own gradual schedule is measured in `benchmarks/low_rank.py`.

    python benchmarks/tucker2.py          # writes the `tucker2` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import time

import numpy as np
import tensorly as tl
import torch
from _common import machine, mean_std, update_results
from low_rank import RESNET_CONVS, fit, task
from mnist1d_accuracy import verdict
from tensorly.decomposition import partial_tucker
from torch import nn

from lightning_compress.analysis.report import flops_per_sample

FINE_TUNE = 10
METHODS = ("SVD: k×k to r, then 1×1 (ours)", "Tucker-2: 1×1, k×k, 1×1 (tensorly)")


def conv(cin: int, cout: int, like: nn.Conv2d, kernel: bool) -> nn.Conv2d:
    """A convolution with ``like``'s stride/padding/dilation (``kernel``) or a 1×1."""
    if kernel:
        return nn.Conv2d(cin, cout, like.kernel_size, like.stride, like.padding, like.dilation, bias=False)
    return nn.Conv2d(cin, cout, 1, bias=False)


@torch.no_grad()
def svd_factors(layer: nn.Conv2d, share: float) -> nn.Sequential:
    out, cin, kh, kw = layer.weight.shape
    rank = max(1, math.floor(share * out * cin * kh * kw / (cin * kh * kw + out)))
    u, s, vh = torch.linalg.svd(layer.weight.reshape(out, -1), full_matrices=False)
    first, second = conv(cin, rank, layer, True), conv(rank, out, layer, False)
    first.weight.copy_((s[:rank, None].sqrt() * vh[:rank]).reshape(rank, cin, kh, kw))
    second.weight.copy_((u[:, :rank] * s[:rank].sqrt()).reshape(out, rank, 1, 1))
    return nn.Sequential(first, second)


def tucker_ranks(layer: nn.Conv2d, share: float, stride_positions: float) -> tuple[int, int]:
    """The largest r_in = β·in, r_out = β·out whose three convolutions cost at most ``share`` of the layer's FLOPs
    (the first 1×1 runs at the input's resolution: ``stride_positions`` input positions per output position)."""
    out, cin, kh, kw = layer.weight.shape
    dense = out * cin * kh * kw
    for beta in np.arange(1.0, 0.0, -0.01):
        r_in, r_out = max(1, round(beta * cin)), max(1, round(beta * out))
        if stride_positions * cin * r_in + r_in * r_out * kh * kw + r_out * out <= share * dense:
            return r_in, r_out
    return 1, 1


@torch.no_grad()
def tucker_factors(layer: nn.Conv2d, share: float, stride_positions: float) -> nn.Sequential:
    out, cin, kh, kw = layer.weight.shape
    r_in, r_out = tucker_ranks(layer, share, stride_positions)
    (core, (u_out, u_in)), _ = partial_tucker(layer.weight.detach().double(), rank=[r_out, r_in], modes=[0, 1],
                                              init="svd", n_iter_max=100, random_state=0)  # fmt: skip
    first, middle, last = conv(cin, r_in, layer, False), conv(r_in, r_out, layer, True), conv(r_out, out, layer, False)
    first.weight.copy_(u_in.t().reshape(r_in, cin, 1, 1).float())
    middle.weight.copy_(core.float())
    last.weight.copy_(u_out.reshape(out, r_out, 1, 1).float())
    return nn.Sequential(first, middle, last)


def factorize(net: nn.Module, method: str, share: float) -> float:
    """Replace the selected convolutions in place; the mean relative reconstruction error of their filters."""
    errors = []
    for name, layer in [(n, m) for n, m in net.named_modules() if re.search(RESNET_CONVS, n)]:
        if not isinstance(layer, nn.Conv2d):
            continue
        stride = layer.stride[0] * layer.stride[1]
        new = svd_factors(layer, share) if method == METHODS[0] else tucker_factors(layer, share, stride)
        errors.append(float((effective_weight(new) - layer.weight).norm() / layer.weight.norm()))
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent), child, new)
    return float(np.mean(errors))


@torch.no_grad()
def effective_weight(seq: nn.Sequential) -> torch.Tensor:
    """The single k×k filter bank the chain of convolutions computes (1×1 convolutions are matrices)."""
    weight = None
    for layer in seq:
        w = layer.weight
        if weight is None:
            weight = w
        elif w.shape[2:] == (1, 1):
            weight = torch.einsum("or,rikl->oikl", w[:, :, 0, 0], weight)
        else:  # a k×k after a 1×1: fold the 1×1 into the k×k's input channels
            weight = torch.einsum("orkl,ri->oikl", w, weight[:, :, 0, 0])
    assert weight is not None
    return weight


def share_for(goal: float) -> float:
    """The largest per-layer FLOPs share (0.01 steps) at which both factorized networks have ≤ 1/goal dense FLOPs."""
    from lightning_compress.tasks import ResNet20

    x = torch.randn(1, 1, 8, 8)
    torch.manual_seed(0)
    dense = ResNet20((1, 8, 8), 10, width=16).eval()
    base = flops_per_sample(dense, x)
    for share in np.arange(0.9, 0.05, -0.01):
        if all(base / flops_per_sample(made(dense, m, float(share)), x) >= goal for m in METHODS):
            return round(float(share), 2)
    raise ValueError(f"no share reaches {goal}x fewer FLOPs")


def made(dense: nn.Module, method: str, share: float) -> nn.Module:
    net = copy.deepcopy(dense)
    factorize(net, method, share)
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tl.set_backend("pytorch")
    start = time.perf_counter()
    share = share_for(2.0)
    x = torch.randn(1, 1, 8, 8)
    results: dict[str, dict[str, list[float]]] = {}
    flops: dict[str, float] = {}
    for seed in range(args.seeds):
        cfg, dm, module = task(seed, "resnet20")
        trainer = fit(cfg, module, dm, 30)
        dense_acc = 100 * trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"]
        results.setdefault("dense", {}).setdefault("after fine-tuning", []).append(dense_acc)
        flops["dense"] = flops_per_sample(module.net, x)
        for method in METHODS:
            tuned = copy.deepcopy(module)
            error = factorize(tuned.net, method, share)
            flops[method] = flops_per_sample(tuned.net, x)
            row = results.setdefault(method, {})
            row.setdefault("error", []).append(error)
            probe = fit(cfg, tuned, dm, 0)
            row.setdefault("at the cut", []).append(
                100 * probe.test(tuned, datamodule=dm, verbose=False)[0]["test/acc"]
            )
            trainer = fit(cfg, tuned, dm, FINE_TUNE)
            row.setdefault("after fine-tuning", []).append(
                100 * trainer.test(tuned, datamodule=dm, verbose=False)[0]["test/acc"]
            )
        print(seed, {m: {k: v[-1] for k, v in r.items()} for m, r in results.items()}, flush=True)
    dense = results["dense"]["after fine-tuning"]
    rows = [f"| dense (30 epochs) | — | — | {mean_std(dense)} | — | 1.00× |"]
    for method in METHODS:
        r = results[method]
        rows.append(f"| {method} | {np.mean(r['error']):.3f} | {mean_std(r['at the cut'])} | "
                    f"{mean_std(r['after fine-tuning'])} | {verdict(r['after fine-tuning'], dense)} | "
                    f"{flops['dense'] / flops[method]:.2f}× |")  # fmt: skip
    svd, tucker = (results[m]["after fine-tuning"] for m in METHODS)
    minutes = (time.perf_counter() - start) / 60
    body = f"""## Low rank: our SVD form against Tucker-2 at the same FLOPs

`python benchmarks/tucker2.py` — digits, ResNet-20-style width 16, seeds 0–{args.seeds - 1}: every 3×3 convolution of
the residual blocks factorized once after 30 dense epochs, each kept at {share:.2f} of its FLOPs (the network at half
the dense FLOPs), then {FINE_TUNE} epochs of fine-tuning. Error: ‖W − Ŵ‖/‖W‖ of the filters, mean over the layers.
Test accuracy %, mean ± std; "vs dense" by Welch's t-test. Tucker-2 against SVD after fine-tuning:
{verdict(tucker, svd)}. {minutes:.0f} min. {machine()}.

| form | filter error | accuracy at the cut | after fine-tuning | vs dense | FLOPs reduction |
|---|---:|---:|---:|---|---:|
""" + "\n".join(rows)
    update_results("tucker2", body)


if __name__ == "__main__":
    main()
