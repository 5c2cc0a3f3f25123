"""Accuracy of MagnitudePruning on digits against the dense model and Lightning's ModelPruning.

Same model, data, optimizer and epochs as the default recipe (`recipe=digits_prune90`: small CNN, AdamW,
30 epochs, ramp over epochs 0-20). For each sparsity, MagnitudePruning and Lightning's ModelPruning are driven
along the same cubic ramp (ModelPruning prunes at epoch ends, global L1 unstructured, no lottery-ticket reset)
and evaluated on the same held-out test split; 3 training seeds each.

    python benchmarks/accuracy.py             # writes the `accuracy` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import lightning.pytorch as pl
import torch
from _common import cubic_amounts, machine, mean_std, update_results
from lightning.pytorch.callbacks import ModelPruning

from lightning_compress import MagnitudePruning
from lightning_compress.apps.config import compose, instantiate
from lightning_compress.core.selection import select_modules, weights_of

SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)


def train(
    seed: int, method: str, sparsity: float | None, epochs: int, end_epoch: int, recipe: str = "dense"
) -> tuple[float, float]:
    """Test accuracy (%) and measured sparsity of the Conv/Linear weights after one run of the dense ``recipe``'s
    task (data, model, optimizer) with ``method``."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"recipe={recipe}", "logger=none", "callbacks=none", f"paths.output_dir={tmp}"]
        cfg = compose([*overrides, f"trainer.max_epochs={epochs}"])
        pl.seed_everything(seed)
        dm = instantiate(cfg.data)  # the split (data seed 0) is the same for every run
        net = instantiate(cfg.model, input_shape=dm.input_shape, num_classes=dm.num_classes)
        module = instantiate(cfg.module, net=net, num_classes=dm.num_classes)
        callbacks: list[pl.Callback] = []
        if method == "MagnitudePruning":
            callbacks.append(MagnitudePruning(final_sparsity=sparsity, end_epoch=end_epoch))
        elif method == "MagnitudePruning 2:4":
            callbacks.append(
                MagnitudePruning(final_sparsity=0.5, granularity="2:4", end_epoch=end_epoch, exclude=r"features\.0$")
            )
        elif method == "ModelPruning":
            params = [(m, "weight") for _, m in select_modules(module)]
            callbacks.append(
                ModelPruning(
                    "l1_unstructured",
                    parameters_to_prune=params,
                    amount=cubic_amounts(sparsity, end_epoch),
                    use_lottery_ticket_hypothesis=False,
                    verbose=0,
                )
            )
        trainer = instantiate(
            cfg.trainer, callbacks=callbacks, logger=False, enable_progress_bar=False, enable_checkpointing=False
        )
        trainer.fit(module, datamodule=dm)
        accuracy = 100 * trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"]
    weights = weights_of(select_modules(module, exclude=r"features\.0$" if "2:4" in method else None))
    total = sum(w.numel() for w in weights.values())
    measured = 1 - sum(int(torch.count_nonzero(w)) for w in weights.values()) / total
    return accuracy, measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--end-epoch", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    seeds = list(range(args.seeds))

    def runs(method, sparsity=None):
        out = [train(s, method, sparsity, args.epochs, args.end_epoch) for s in seeds]
        accs, sps = [a for a, _ in out], [s for _, s in out]
        print(f"{method:22s} {sparsity!s:5s} acc {mean_std(accs)}  sparsity {statistics.mean(sps):.4f}", flush=True)
        return accs, statistics.mean(sps)

    dense, _ = runs("dense")
    dense_mean = statistics.mean(dense)
    rows, verdicts = [], []
    for s in SPARSITIES:
        ours, ours_sp = runs("MagnitudePruning", s)
        peer, peer_sp = runs("ModelPruning", s)
        gap = statistics.mean(ours) - dense_mean
        beats = statistics.mean(ours) >= statistics.mean(peer)
        rows.append(
            f"| {s:.0%} | {mean_std(ours)} ({ours_sp:.2%}) | {mean_std(peer)} ({peer_sp:.2%}) | {gap:+.2f} | "
            f"{'yes' if beats else 'no'} |"
        )
        if s in (0.95, 0.98):
            limit = 0.3 if s == 0.95 else 0.6
            verdicts.append(
                f"{s:.0%}: {gap:+.2f} points vs dense (goal ≥ −{limit}) — {'met' if gap >= -limit else 'missed'}"
            )
    nm, nm_sp = runs("MagnitudePruning 2:4")
    rows.append(f"| 2:4 | {mean_std(nm)} ({nm_sp:.2%}) | not offered | {statistics.mean(nm) - dense_mean:+.2f} | — |")
    beats_all = all(r.endswith("| yes |") for r in rows[:-1])
    body = (
        f"""## Accuracy on digits: MagnitudePruning vs dense vs Lightning ModelPruning

`python benchmarks/accuracy.py` — small CNN (188 k Conv/Linear weights), digits (1,797 real 8×8 images; the same
held-out test split of 360 images for every run, so one image is 0.28 points), AdamW, {args.epochs} epochs, cubic
ramp over epochs 0–{args.end_epoch}, training seeds {seeds}; mean ± standard deviation of the test accuracy (%),
measured sparsity of the pruned weights in brackets. ModelPruning: Lightning's callback, global L1 unstructured,
amounts per epoch chosen so that its cumulative sparsity follows the same cubic ramp, no lottery-ticket reset.
2:4 leaves the first conv (9 inputs per filter, not a multiple of 4) dense.
Machine: {machine()}.

Dense: **{mean_std(dense)}**

| sparsity | MagnitudePruning | ModelPruning | ours − dense | ours ≥ peer |
|---|---:|---:|---:|:---:|
"""
        + "\n".join(rows)
        + f"""

Goals: at every sparsity at least the peer's accuracy — {"met" if beats_all else "missed (see the table)"}; """
        + "; ".join(verdicts)
        + "."
    )
    update_results("accuracy", body)


if __name__ == "__main__":
    main()
