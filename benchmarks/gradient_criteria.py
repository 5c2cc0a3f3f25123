"""Gradient-based pruning criteria against magnitude, fine-tuning a trained dense model to 90 / 95 / 98 % sparsity.

For each task and seed a dense model is trained once (the `dense` / `mnist1d_dense` recipe: 30 epochs); then, from
those same weights, each criterion fine-tunes it for 10 epochs with `MagnitudePruning(final_sparsity=s,
start_epoch=0, end_epoch=6, criterion=c)` (the same cubic ramp, one global ranking, the module's own optimizer and
learning rate). Test accuracy of each; mean ± std over the seeds; a criterion is called better than magnitude only when
Welch's t-test gives p < 0.05. The published expectation (Sanh et al. 2020): movement wins in this fine-tuning regime
at high sparsity; magnitude wins at low sparsity.

Tasks: digits (the small CNN, 188 k weights) and MNIST-1D (the paper's CNN, where pruning costs accuracy).

    python benchmarks/gradient_criteria.py     # writes the `gradient_criteria` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import time

import lightning.pytorch as pl
import torch
from _common import machine, mean_std, update_results
from mnist1d_accuracy import verdict

from lightning_compress import MagnitudePruning
from lightning_compress.apps.config import compose, instantiate

TASKS = {"digits": "dense", "MNIST-1D": "mnist1d_dense"}
SPARSITIES = (0.9, 0.95, 0.98)
CRITERIA = ("magnitude", "taylor", "movement")
DENSE_EPOCHS, FINE_TUNE_EPOCHS, RAMP_END = 30, 10, 6


def setup(recipe: str, seed: int):
    cfg = compose([f"recipe={recipe}", "logger=none", "callbacks=none", "paths.output_dir=/tmp/unused"])
    pl.seed_everything(seed)
    dm = instantiate(cfg.data)
    net = instantiate(cfg.model, input_shape=dm.input_shape, num_classes=dm.num_classes)
    return cfg, dm, instantiate(cfg.module, net=net, num_classes=dm.num_classes)


def fit(cfg, module, dm, epochs: int, callbacks=()) -> float:
    trainer = instantiate(cfg.trainer, max_epochs=epochs, callbacks=list(callbacks), logger=False,
                          enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return 100 * trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    acc: dict[tuple[str, float, str], list[float]] = {}
    dense: dict[str, list[float]] = {t: [] for t in TASKS}
    for seed in range(args.seeds):
        for task, recipe in TASKS.items():
            cfg, dm, module = setup(recipe, seed)
            dense[task].append(fit(cfg, module, dm, DENSE_EPOCHS))
            trained = copy.deepcopy(module.state_dict())
            for sparsity in SPARSITIES:
                for criterion in CRITERIA:
                    cfg, dm, module = setup(recipe, seed)  # same seed: same split and data order for every criterion
                    module.load_state_dict(trained)
                    cb = MagnitudePruning(final_sparsity=sparsity, start_epoch=0, end_epoch=RAMP_END,
                                          criterion=criterion)  # fmt: skip
                    accuracy = fit(cfg, module, dm, FINE_TUNE_EPOCHS, [cb])
                    assert abs(cb.sparsity() - sparsity) < 1e-3
                    acc.setdefault((task, sparsity, criterion), []).append(accuracy)
                    print(task, seed, sparsity, criterion, round(accuracy, 2), flush=True)
    minutes = (time.perf_counter() - start) / 60

    rows, verdicts = [], []
    for task in TASKS:
        for sparsity in SPARSITIES:
            base = acc[(task, sparsity, "magnitude")]
            cells = [mean_std(acc[(task, sparsity, c)]) for c in CRITERIA]
            versus = [verdict(acc[(task, sparsity, c)], base) for c in CRITERIA[1:]]
            rows.append(f"| {task} | {100 * sparsity:g} % | {mean_std(dense[task])} | {' | '.join(cells)} | "
                        f"{' | '.join(versus)} |")  # fmt: skip
            means = {c: sum(acc[(task, sparsity, c)]) / args.seeds for c in CRITERIA}
            best = max(means, key=lambda c: means[c])
            beyond = best != "magnitude" and "beyond" in verdict(acc[(task, sparsity, best)], base)
            verdicts.append(f"{task} {100 * sparsity:g} %: {best} highest" + (" (beyond noise)" if beyond else
                            " (within noise of magnitude)" if best != "magnitude" else ""))  # fmt: skip
    body = f"""
## Gradient criteria: Taylor and movement against magnitude, fine-tuning to 90 / 95 / 98 %

`python benchmarks/gradient_criteria.py` — {args.seeds} seeds; per task and seed one dense model ({DENSE_EPOCHS}
epochs), then from its weights each criterion fine-tunes {FINE_TUNE_EPOCHS} epochs with the same cubic ramp
(epochs 0–{RAMP_END}, global ranking, the module's optimizer). Test accuracy (%), mean ± std; "vs magnitude" is the
difference of means with Welch's p. {minutes:.0f} min. {machine()}.

| task | sparsity | dense | magnitude | taylor | movement | taylor vs magnitude | movement vs magnitude |
| --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Which wins where: {"; ".join(verdicts)}.
"""
    update_results("gradient_criteria", body)
    print(body)


if __name__ == "__main__":
    main()
