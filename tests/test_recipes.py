"""load_recipe: every shipped recipe's callbacks train in a user's own Trainer; paths and bad names."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from torch import nn

from lightning_compress import (
    KnowledgeDistillation,
    MagnitudePruning,
    QuantizationAwareTraining,
    WeightClustering,
    available_recipes,
    load_recipe,
)
from lightning_compress.tasks import DigitsDataModule

FAST = {  # shorter teachers, so that every recipe runs in seconds here
    "digits_distill": ["compression.distillation.teacher.max_epochs=1"],
    "digits_deep_compression": ["compression.distillation.teacher.max_epochs=1"],
    "digits_deep_compression_clustered": ["compression.distillation.teacher.max_epochs=1"],
    "digits_resnet20_channel_qat_kd": ["compression.distillation.teacher.max_epochs=1"],
    # no CIFAR-10 here: its teacher (a ResNet) learns digits for an epoch, as the user's module below does
    "cifar10_resnet20_deep_compression": [
        "compression.distillation.teacher.max_epochs=1",
        "compression.distillation.teacher.model.blocks=1",
        "+compression.distillation.teacher.data={_target_: lightning_compress.tasks.DigitsDataModule}",
    ],
}


class UserNet(nn.Module):
    """A user's own model: other layer names and shapes than the project's SmallCNN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3)  # 9 inputs per filter: not a multiple of 4 (2:4 recipes leave @first out)
        self.norm = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 12, 3)
        self.head = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.norm(self.stem(x)))
        return self.head(torch.relu(self.body(x)).flatten(1))


class UserModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = UserNet()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


@pytest.mark.parametrize("name", available_recipes())
def test_every_recipe_trains_in_a_users_own_trainer_and_reaches_its_target(name, tmp_path):
    """Portable recipes: loaded as they ship (only teachers shortened), into a user's Trainer of 2 epochs (the
    recipes are written for 30 or 160) and a user's own model, every recipe trains and reaches its target."""
    callbacks = load_recipe(name, overrides=FAST.get(name, []), output_dir=tmp_path)
    module = UserModule()
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_epochs=2, limit_val_batches=0)
    # the user's batches: 73 optimizer steps per epoch (QAT's 20 calibration steps fit in the last quarter of a run)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    assert trainer.current_epoch == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())
    for cb in callbacks:
        if isinstance(cb, MagnitudePruning):
            # channel granularity: final_sparsity is the share of channels removed (by dependency group)
            measured = cb.channel_sparsity() if cb.granularity.kind == "channel" else cb.sparsity()
            assert cb.target_reached and measured == pytest.approx(cb.final_sparsity, abs=0.01)
        if isinstance(cb, QuantizationAwareTraining):
            assert cb.target_reached  # fake-quantizing by the end of the user's run
        if isinstance(cb, WeightClustering):  # every layer shares its clusters (plus the pruned zeros)
            assert cb.target_reached
            for name, book in cb.codebooks.items():
                weight = dict(module.named_parameters())[f"{name}.weight"].detach()
                assert set(weight[weight != 0].unique().tolist()) <= set(book.tolist())
    if name in ("digits_qat_w4",):  # per-layer bits by selectors: first and last layer at 8 bits, the rest at 4
        (qat,) = callbacks
        assert {n: layer.weight_quantizer.spec.bits for n, layer in qat.layers.items()} == {
            "net.stem": 8, "net.body": 4, "net.head": 8
        }  # fmt: skip
    if name.endswith("2of4"):
        (pruning,) = callbacks
        assert pruning.selected_layers == ["net.body", "net.head"]


def test_loading_a_distillation_recipe_trains_nothing(tmp_path):
    started = time.perf_counter()
    (kd,) = load_recipe("digits_distill", output_dir=tmp_path)
    assert time.perf_counter() - started < 10 and not (tmp_path / "teacher.ckpt").exists()
    with pytest.raises(RuntimeError, match="built when fit starts"):
        _ = kd.teachers


def test_recipe_contents():
    (pruning,) = load_recipe("digits_prune90")
    # written for its own 30 epochs: the ramp ends at two thirds of whichever Trainer it is used in
    assert isinstance(pruning, MagnitudePruning) and pruning.final_sparsity == 0.9
    assert pruning.end_epoch == "66.66666666666667%" and pruning.start_epoch == "0%"
    (absolute,) = load_recipe("digits_prune90", follow_trainer_length=False)
    assert absolute.end_epoch == 20
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
