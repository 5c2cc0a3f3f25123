"""Channel groups: accuracy at 2x and 3x fewer FLOPs against Torch-Pruning's own prune-then-fine-tune, and the ONNX
Runtime speed of the compact network.

Part 1 — MNIST-1D, the paper's CNN with BatchNorm (`recipe=mnist1d_dense`: AdamW, lr 3e-3, 30 epochs), and digits
(8×8) with the ResNet-20-style network of width 16 (`recipe=dense model=resnet20`), 3 seeds on one split. For each
FLOPs goal the share of channels is the smallest one (in steps of 0.01) whose compact network has at most 1/2 or 1/3
of the dense FLOPs. Ours: `MagnitudePruning(granularity="channel", scope="layer")` ramping
to that share over epochs 0-20 of 30, then `export_compact`. Peer: Torch-Pruning's `MetaPruner` with
`GroupMagnitudeImportance(p=2)` (L2 group magnitude, as ours), at the share per layer just below the one that
removes more FLOPs than ours, applied after 20 dense epochs and fine-tuned for the last 10 (the same 30 epochs in
all). Both keep the output layer whole.

Part 2 — ONNX Runtime, 2 threads: the ResNet-20-style network (32×32 inputs, widths 16 and 64) dense against its
compact networks at the same 2x / 3x FLOPs goals, as chosen and with each layer's kept channels rounded to a
multiple of 8 (`round_to=8`; the FLOPs then move a little: see the table), batch 1 and batch 256, interleaved
rounds: median of the rounds' medians and the lowest-highest round (speed does not depend on the weights: the
channels are chosen once by group magnitude on the initial weights).

    python benchmarks/channel_groups.py       # writes the `channel_groups` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from _common import interleaved_ort_medians, machine, mean_std, update_results
from mnist1d_accuracy import verdict
from torch.utils.data import TensorDataset

from lightning_compress import MagnitudePruning, export_compact
from lightning_compress.analysis.latency import ort_session
from lightning_compress.analysis.report import flops_per_sample
from lightning_compress.apps.config import compose, instantiate
from lightning_compress.export.onnx import export_float_onnx
from lightning_compress.pruning import prune_channel_groups_
from lightning_compress.tasks import CNN1D, DigitsDataModule, ResNet20

GOALS = (2, 3)


def share_for(make, x: torch.Tensor, goal: float, round_to: int | None = None) -> tuple[float, float]:
    """The smallest channel share (0.01 steps) whose compact network has at most 1/goal of the dense FLOPs, and the
    FLOPs ratio it gives."""
    dense = flops_per_sample(make(), x)
    for share in np.arange(0.05, 0.95, 0.01):
        model = make().eval()
        prune_channel_groups_(model, x, float(share), scope="layer", round_to=round_to)
        ratio = dense / flops_per_sample(export_compact(model, x), x)
        if ratio >= goal:
            return round(float(share), 2), ratio
    raise ValueError(f"no share reaches {goal}x fewer FLOPs")


def metapruner(net: torch.nn.Module, x: torch.Tensor, share: float) -> torch.nn.Module:
    """Torch-Pruning's MetaPruner with L2 group magnitude (as ours), ``share`` of each layer's channels, output layer
    whole; pruned in place."""
    net.eval()
    tp.pruner.MetaPruner(
        net, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=share,
        global_pruning=False, ignored_layers=[last_layer(net)],
    ).step()  # fmt: skip
    return net


def peer_share_for(make, x: torch.Tensor, ratio: float) -> float:
    """The MetaPruner share (0.01 steps, rising) just before its network has more than ``ratio``x fewer FLOPs than
    dense: the peer is compared at the FLOPs ours reached (its share-to-FLOPs rule differs from ours on residual
    networks), never at fewer."""
    dense = flops_per_sample(make(), x)
    best = 0.0
    for share in np.arange(0.05, 0.95, 0.01):
        if dense / flops_per_sample(metapruner(make(), x, float(share)), x) > ratio + 1e-9:
            break
        best = round(float(share), 2)
    return best


class Digits32(DigitsDataModule):
    """The digits upscaled to 32×32 (bilinear), as the ResNet-20's CIFAR-sized input."""

    input_shape = (1, 32, 32)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        super().setup(stage)
        for name in ("train_set", "val_set", "test_set"):
            x, y = getattr(self, name).tensors
            setattr(self, name, TensorDataset(F.interpolate(x, size=32, mode="bilinear", align_corners=False), y))


#: The accuracy tasks: (recipe, model override, the name in the table).
TASKS = {"mnist1d": ("mnist1d_dense", None, "MNIST-1D CNN"), "resnet20": ("dense", "resnet20", "ResNet-20 w16, digits"),
         "resnet20_32": ("dense", "resnet20", "ResNet-20 w16, digits at 32×32")}  # fmt: skip


def task(seed: int, name: str = "mnist1d"):
    recipe, model, _ = TASKS[name]
    overrides = [f"recipe={recipe}", "logger=none", "callbacks=none", "paths.output_dir=/tmp/unused"]
    cfg = compose(overrides + ([f"model={model}"] if model else []))
    pl.seed_everything(seed)
    dm = instantiate(cfg.data)
    if name == "resnet20_32":
        dm = Digits32(batch_size=dm.batch_size, val_fraction=dm.val_fraction, test_fraction=dm.test_fraction,
                      seed=dm.seed)  # fmt: skip
    net = instantiate(cfg.model, input_shape=dm.input_shape, num_classes=dm.num_classes)
    return cfg, dm, instantiate(cfg.module, net=net, num_classes=dm.num_classes)


def trainer(cfg, epochs: int, callbacks=()):
    return instantiate(cfg.trainer, max_epochs=epochs, callbacks=list(callbacks), logger=False,
                       enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip


def run(
    seed: int, method: str, share: float | None, x: torch.Tensor, name: str = "mnist1d", round_to: int | None = None
) -> tuple[float, int]:
    """Test accuracy (%) and FLOPs per sample of the final (compact) network (ours: channels kept in multiples of
    ``round_to`` when given)."""
    cfg, dm, module = task(seed, name)
    if method == "dense":
        t = trainer(cfg, 30)
        t.fit(module, datamodule=dm)
        return 100 * t.test(module, datamodule=dm, verbose=False)[0]["test/acc"], flops_per_sample(module.net, x)
    if method == "ours":
        cb = MagnitudePruning(final_sparsity=share, granularity="channel", scope="layer", end_epoch=20,
                              round_to=round_to)  # fmt: skip
        t = trainer(cfg, 30, [cb])
        t.fit(module, datamodule=dm)
        accuracy = 100 * t.test(module, datamodule=dm, verbose=False)[0]["test/acc"]
        compact = export_compact(module.net, x)
        return accuracy, flops_per_sample(compact, x)
    # Torch-Pruning's pipeline: 20 dense epochs, MetaPruner once, 10 epochs of fine-tuning
    t = trainer(cfg, 20)
    t.fit(module, datamodule=dm)
    metapruner(module.net, x, share)
    t = trainer(cfg, 10)
    t.fit(module, datamodule=dm)
    return 100 * t.test(module, datamodule=dm, verbose=False)[0]["test/acc"], flops_per_sample(module.net, x)


def table_rows(name: str, x: torch.Tensor, seeds: int, variants: dict[str, tuple]) -> list[str]:
    """Train every variant (label → the arguments of :func:`run` after the seed: method, share[, round_to]) for each
    seed; the table's rows (accuracy, the verdict against ``"dense"``, the FLOPs reduction)."""
    results: dict[str, list[tuple[float, int]]] = {}
    for seed in range(seeds):
        for label, (method, *arguments) in variants.items():
            results.setdefault(label, []).append(run(seed, method, arguments[0], x, name, *arguments[1:]))
        print(name, seed, {k: v[-1] for k, v in results.items()}, flush=True)
    dense = [a for a, _ in results["dense"]]
    rows = []
    for kind, runs in results.items():
        accuracy = [a for a, _ in runs]
        versus = "—" if kind == "dense" else verdict(accuracy, dense)
        rows.append(f"| {TASKS[name][2]} | {kind} | {mean_std(accuracy)} | {versus} | "
                    f"{results['dense'][0][1] / runs[0][1]:.2f}× |")  # fmt: skip
    return rows


def last_layer(net: torch.nn.Module) -> torch.nn.Module:
    """The network's output layer (kept whole by both methods)."""
    return [m for m in net.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear))][-1]


def speed(width: int, shares: dict[int, float], rounds: int, threads: int, tmp: Path) -> list[str]:
    """ORT latency rows: dense and the compact networks of each goal, interleaved."""
    x = torch.randn(8, 3, 32, 32)
    torch.manual_seed(0)
    dense = ResNet20((3, 32, 32), 10, width=width).eval()
    models = {"dense": dense}
    for goal, share in shares.items():
        for round_to in (None, 8):
            model = copy.deepcopy(dense)
            prune_channel_groups_(model, x, share, scope="layer", round_to=round_to)
            name = f"compact, {goal}x fewer FLOPs" + (f", channels kept in multiples of {round_to}" if round_to else "")
            models[name] = export_compact(model, x)
    sessions = {k: ort_session(export_float_onnx(m, tmp / f"w{width}-{i}.onnx", x), threads) for i, (k, m) in
                enumerate(models.items())}  # fmt: skip
    medians = interleaved_ort_medians(sessions, rounds, (3, 32, 32))
    rows = []
    for kind, model in models.items():
        cells = []
        for batch in (1, 256):
            ups = [d / m for d, m in zip(medians["dense", batch], medians[kind, batch], strict=True)]
            cells.append(f"{statistics.median(medians[kind, batch]) * 1e3:.2f} | {statistics.median(ups):.2f}× "
                         f"({min(ups):.2f}–{max(ups):.2f})")  # fmt: skip
        rows.append(f"| {width} | {kind} | {sum(p.numel() for p in model.parameters()):,} | "
                    f"{flops_per_sample(model, x) / 1e6:.1f} M | {cells[0]} | {cells[1]} |")  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def shares_text(all_shares: dict) -> str:
    return "; ".join(
        f"{TASKS[name][2]}: " + ", ".join(f"{s:.2f} for {g}× ({r:.2f}× measured)" for g, (s, r) in shares.items())
        for name, shares in all_shares.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    inputs = {"mnist1d": (CNN1D, torch.randn(16, 1, 40)),
              "resnet20": (lambda: ResNet20((1, 8, 8), 10, width=16), torch.randn(16, 1, 8, 8))}  # fmt: skip
    rows = []
    all_shares: dict = {}
    all_peer_shares: dict = {}
    for name, (make, x) in inputs.items():
        shares = all_shares[name] = {goal: share_for(make, x, goal) for goal in GOALS}
        peer = all_peer_shares[name] = {goal: peer_share_for(make, x, ratio) for goal, (_, ratio) in shares.items()}
        variants: dict[str, tuple] = {"dense": ("dense", None)}
        for goal, (share, _) in shares.items():
            variants[f"ours, {goal}x"] = ("ours", share)
            variants[f"Torch-Pruning MetaPruner, {goal}x"] = ("Torch-Pruning MetaPruner", peer[goal])
        rows += table_rows(name, x, args.seeds, variants)
    with tempfile.TemporaryDirectory() as tmp:
        resnet_shares = {goal: share_for(lambda: ResNet20((3, 32, 32), 10, width=16), torch.randn(8, 3, 32, 32),
                                         goal)[0] for goal in GOALS}  # fmt: skip
        speed_rows = [r for width in (16, 64) for r in speed(width, resnet_shares, args.rounds, args.threads,
                                                               Path(tmp))]  # fmt: skip
    body = (
        f"""## Channel groups: accuracy at 2× and 3× fewer FLOPs, and the compact network's speed

`python benchmarks/channel_groups.py` — Machine: {machine()}.

MNIST-1D, the paper's CNN with BatchNorm, and digits (8×8) with the ResNet-20-style network of width 16 (`recipe=dense
model=resnet20`: AdamW, 30 epochs), seeds 0–{args.seeds - 1} (test accuracy %, mean ± std; "vs dense" with Welch's
t-test over the seeds). Shares of channels removed per group: {shares_text(all_shares)}. Ours:
`MagnitudePruning(granularity="channel", scope="layer")` ramped over epochs 0–20, then `export_compact` (FLOPs of the
compact network). Peer: Torch-Pruning `MetaPruner` (`GroupMagnitudeImportance(p=2)`, output layer whole) after 20
dense epochs, 10 epochs of fine-tuning, at the share per layer just below the one that removes more FLOPs than ours
(its shares: {all_peer_shares}).

| task | model | accuracy | vs dense | FLOPs reduction |
|---|---|---:|---|---:|
"""
        + "\n".join(rows)
        + f"""

ONNX Runtime, 2 threads, ResNet-20-style at 32×32, {args.rounds} interleaved rounds: median latency (ms) and the
speed-up over dense (median, lowest–highest round). Shares for the ResNet: {resnet_shares}.

| width | model | parameters | FLOPs / sample | batch 1 (ms) | vs dense | batch 256 (ms) | vs dense |
|---:|---|---:|---:|---:|---:|---:|---:|
"""
        + "\n".join(speed_rows)
    )
    update_results("channel_groups", body)


if __name__ == "__main__":
    main()
