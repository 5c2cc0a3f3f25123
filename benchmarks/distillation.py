"""Distillation on digits: how much of the teacher–student gap the distilled student recovers, and its step time.

Set-up of recipe `digits_distill`: teacher = small CNN (width 32, 30 epochs), student = MLP with one hidden layer of
32 (lr 1e-2, 30 epochs), T = 4, alpha = 0.9. For each of 3 seeds: the teacher (all labels), the student alone and
the distilled student, with 100 % and with 10 % of the training labels (the other 90 % of the images stay, without
labels: the task loss ignores them, the teacher still teaches on them). Recovery = (distilled − alone) / (teacher −
alone). Then the step time of distillation vs the student alone, with and without the teacher-output cache.

    python benchmarks/distillation.py          # writes the `distillation` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics

import lightning.pytorch as pl
import torch
from _common import StepTimer, machine, mean_std, update_results

from lightning_compress import KnowledgeDistillation
from lightning_compress.tasks import MLP, ClassificationModule, DigitsDataModule, SmallCNN


def fit(net, callbacks, epochs, fraction=1.0, lr=1e-2, timer=None, dm=None):
    """Test accuracy (%) and the module after training ``net`` on ``dm`` (digits with ``fraction`` of the labels)."""
    module = ClassificationModule(net, lr=lr)
    dm = dm if dm is not None else DigitsDataModule(train_label_fraction=fraction)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[*callbacks, *([timer] if timer else [])],
    )  # fmt: skip
    trainer.fit(module, dm)
    return 100 * trainer.test(module, dm, verbose=False)[0]["test/acc"], module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows: dict[float, dict[str, list[float]]] = {f: {"teacher": [], "alone": [], "distilled": []} for f in (1.0, 0.1)}
    teachers = []
    for seed in range(args.seeds):
        pl.seed_everything(seed)
        teacher_acc, teacher = fit(SmallCNN(width=32), [], args.epochs, lr=3e-3)
        teachers.append(teacher.net)
        for fraction in (1.0, 0.1):
            pl.seed_everything(seed)
            alone, _ = fit(MLP(hidden=[32]), [], args.epochs, fraction)
            pl.seed_everything(seed)
            kd = KnowledgeDistillation(teacher.net, temperature=4.0, alpha=0.9, cache_teacher_outputs=True)
            distilled, _ = fit(MLP(hidden=[32]), [kd], args.epochs, fraction)
            for key, value in (("teacher", teacher_acc), ("alone", alone), ("distilled", distilled)):
                rows[fraction][key].append(value)
            print(seed, fraction, teacher_acc, alone, distilled, flush=True)
    table = []
    verdicts = []
    for fraction, r in rows.items():
        t, a, d = (statistics.mean(r[k]) for k in ("teacher", "alone", "distilled"))
        recovery = (d - a) / (t - a) if t != a else float("nan")
        table.append(
            f"| {fraction:.0%} | {mean_std(r['teacher'])} | {mean_std(r['alone'])} | {mean_std(r['distilled'])} | "
            f"{recovery:.0%} |"
        )
        verdicts.append(f"{fraction:.0%} labels: {recovery:.0%}, {'met' if recovery >= 0.6 else 'missed'}")
    # step time: student alone vs distillation without and with the cache (interleaved, median step)
    steps: dict[str, list[float]] = {"student alone": [], "distillation": [], "distillation + cache": []}
    for _ in range(3):
        for kind in steps:
            timer = StepTimer(skip=3)
            callbacks = []
            if kind != "student alone":
                callbacks.append(KnowledgeDistillation(teachers[0], cache_teacher_outputs=kind.endswith("cache")))
            pl.seed_everything(0)
            fit(MLP(hidden=[32]), callbacks, 3, timer=timer)
            per_epoch = len(timer.steps) // 3
            steps[kind] += timer.steps[-per_epoch:]  # the last epoch: the cache is full by then
    alone_step = statistics.median(steps["student alone"])
    step_rows = [
        f"| {k} | {statistics.median(v) * 1e3:.2f} | {statistics.median(v) / alone_step:.2f}× |"
        for k, v in steps.items()
    ]
    cached = statistics.median(steps["distillation + cache"]) / alone_step
    body = (
        f"""## Distillation on digits: gap recovered, and step time

`python benchmarks/distillation.py` — recipe `digits_distill`'s set-up: teacher small CNN (width 32), student MLP
(one hidden layer of 32), T = 4, alpha = 0.9, {args.epochs} epochs, seeds 0–{args.seeds - 1}; test accuracy (%)
mean ± std; with 10 % of the labels the other 90 % of the training images stay unlabelled (ignored by the task
loss, used by the teacher). Recovery = (distilled − alone) / (teacher − alone), from the means. Goal ≥ 60 % —
{"; ".join(verdicts)}.
Machine: {machine()}.

| labels | teacher | student alone | distilled student | gap recovered |
|---|---:|---:|---:|---:|
"""
        + "\n".join(table)
        + f"""

Step time (median over the last of 3 epochs, 3 interleaved repetitions; the student's steps are tiny, so the
teacher's forward dominates without the cache). Goal with the cache ≤ 1.1× — {cached:.2f}×,
{"met" if cached <= 1.1 else "missed"}.

| set-up | median step (ms) | vs student alone |
|---|---:|---:|
"""
        + "\n".join(step_rows)
    )
    update_results("distillation", body)


if __name__ == "__main__":
    main()
