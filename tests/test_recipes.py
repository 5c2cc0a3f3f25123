"""load_recipe: every shipped recipe's callbacks train in a user's own Trainer; paths and bad names."""

from __future__ import annotations

import pytest
import torch
from conftest import make_trainer, small_module

from lightning_compress import (
    KnowledgeDistillation,
    MagnitudePruning,
    QuantizationAwareTraining,
    available_recipes,
    load_recipe,
)
from lightning_compress.tasks import DigitsDataModule

FAST = {  # shorter teachers, so that every recipe runs in seconds here
    "digits_distill": ["compression.distillation.teacher.max_epochs=1"],
    "digits_deep_compression": ["compression.distillation.teacher.max_epochs=1"],
    # no CIFAR-10 here: its teacher (a ResNet) learns digits for an epoch, as the user's module below does
    "cifar10_resnet20_deep_compression": [
        "compression.distillation.teacher.max_epochs=1",
        "compression.distillation.teacher.model.blocks=1",
        "+compression.distillation.teacher.data={_target_: lightning_compress.tasks.DigitsDataModule}",
    ],
}


@pytest.mark.parametrize("name", available_recipes())
def test_every_recipe_trains_in_a_users_own_trainer(name, tmp_path):
    callbacks = load_recipe(name, overrides=FAST.get(name, []), output_dir=tmp_path)
    module = small_module(width=8, hidden=32)
    # the recipes' schedules are in epochs of a 30-epoch run; one step of a user's run checks they fit together
    for cb in callbacks:
        if isinstance(cb, MagnitudePruning):
            cb.end_epoch = cb.start_epoch = 0.0
        if isinstance(cb, QuantizationAwareTraining):
            cb.start_epoch, cb.calibration_steps = 0.0, 0
            cb.freeze_bn_epoch = cb.freeze_observers_epoch = None
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, DigitsDataModule())
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_recipe_contents():
    (pruning,) = load_recipe("digits_prune90")
    assert isinstance(pruning, MagnitudePruning) and pruning.final_sparsity == 0.9 and pruning.end_epoch == 20
    (nm,) = load_recipe("digits_2of4")
    assert str(nm.granularity) == "2:4"
    kinds = [type(cb) for cb in load_recipe("digits_deep_compression", overrides=FAST["digits_deep_compression"])]
    assert kinds == [MagnitudePruning, QuantizationAwareTraining, KnowledgeDistillation]
    assert load_recipe("dense") == []
    (tuned,) = load_recipe("digits_prune90", overrides=["compression.pruning.final_sparsity=0.8"])
    assert tuned.final_sparsity == 0.8


def test_recipe_from_a_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "# @package _global_\n"
        "defaults:\n  - /compression@compression.pruning: magnitude_pruning\n  - _self_\n"
        "compression:\n  pruning:\n    final_sparsity: 0.7\n    granularity: channel\n"
    )
    (cb,) = load_recipe(path)
    assert cb.final_sparsity == 0.7 and str(cb.granularity) == "channel"
    with pytest.raises(ValueError, match=r"no recipe file at .*missing.yaml"):
        load_recipe(tmp_path / "missing.yaml")


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown recipe 'prune_all'. Available: cifar10_resnet20_2of4, .*, dense, digits_2of4, .*digits_prune90",
    ):
        load_recipe("prune_all")
