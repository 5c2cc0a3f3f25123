"""Gradient-based pruning criteria of MagnitudePruning: first-order Taylor and movement, for single weights, N:M and
channel groups; scores from the optimizer step's (accumulated, unscaled) gradients, kept in the checkpoint."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer, small_module
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_compress import MagnitudePruning, export_compact
from lightning_compress.tasks import ClassificationModule, DigitsDataModule


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def dead_pixels() -> torch.Tensor:
    """Pixels that are 0 in every training image of digits (their first-layer weights never get a gradient)."""
    dm = DigitsDataModule()
    dm.setup("fit")
    images = torch.cat([x.flatten(1) for x, _ in dm.train_dataloader()])
    return (images == 0).all(dim=0)


def big_dead_weights_module() -> ClassificationModule:
    """An MLP whose weights on the dead pixels are the largest of the layer: magnitude keeps them, gradients do not."""
    module = ClassificationModule(MLP())
    with torch.no_grad():
        module.net.fc1.weight[:, dead_pixels()] = 1.0
    return module


@pytest.mark.parametrize("criterion", ["taylor", "movement"])
def test_gradient_criteria_prune_what_does_not_matter_where_magnitude_keeps_it(tmp_path, criterion):
    dead = dead_pixels()
    assert dead.sum() >= 2  # digits has blank corner pixels
    kept = {}
    for name in ("magnitude", criterion):
        pl.seed_everything(0)
        module = big_dead_weights_module()
        cb = MagnitudePruning(final_sparsity=0.5, start_epoch=1, end_epoch=2, scope="layer", criterion=name)
        make_trainer(tmp_path, callbacks=[cb], max_epochs=2).fit(module, DigitsDataModule())
        mask = cb.masks["net.fc1"]
        assert cb.layer_sparsities()["net.fc1"] == pytest.approx(0.5, abs=1e-3)  # exact sparsity either way
        kept[name] = mask[:, dead].float().mean().item()
    assert kept["magnitude"] == 1.0  # the big useless weights survive magnitude pruning ...
    if criterion == "taylor":
        assert kept[criterion] == 0.0  # ... and are the first to go by their zero Taylor scores
    else:
        # ... movement scores them 0 too, which ranks them above the weights training pulls toward zero (negative
        # scores) but not above those it pushes away: largeness alone keeps nothing
        assert kept[criterion] < 0.6


class _Accumulate(Callback):
    """Placed before the pruning callback: sums −w·g (movement) over the optimizer steps the pruning scores too (not
    those the AMP scaler skips), and records the loss scale."""

    def __init__(self, pruning):
        self.pruning, self.sums, self.steps, self.skipped, self.scales = pruning, {}, 0, 0, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(scaler.get_scale() if scaler is not None else 1.0)
        grads = [w.grad for w in self.pruning.weights.values()]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            self.skipped += 1
            return
        if self.pruning.target_reached:
            return
        for name, weight in self.pruning.weights.items():
            term = -(weight.detach() * weight.grad).float()
            self.sums[name] = self.sums.get(name, 0) + term
        self.steps += 1


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "fp16-gradscaler"])
def test_movement_scores_are_the_summed_products_of_unscaled_accumulated_gradients(tmp_path, amp):
    from lightning.pytorch.plugins import MixedPrecision

    pl.seed_everything(0)
    cb = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=2, criterion="movement")
    probe = _Accumulate(cb)
    # fp16 autocast with a real GradScaler on the CPU (Lightning alone would fall back to bf16, which needs no scaler)
    plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))] if amp else []
    trainer = make_trainer(tmp_path, callbacks=[probe, cb], max_epochs=2, accumulate_grad_batches=2,
                           plugins=plugins)  # fmt: skip
    trainer.fit(small_module(), DigitsDataModule())
    assert cb.strategy.scored_steps == probe.steps  # once per optimizer step (not per batch), skipped steps not counted
    assert probe.steps + probe.skipped == trainer.global_step
    for name, total in probe.sums.items():
        torch.testing.assert_close(cb.strategy.scores[name], total, rtol=1e-5, atol=1e-6)
    if amp:
        assert min(probe.scales) >= 2**10  # the loss was scaled ...
    assert max(float(s.abs().max()) for s in cb.strategy.scores.values()) < 100  # ... and the scores were not


@pytest.mark.parametrize("criterion", ["taylor", "movement"])
def test_n_m_pattern_holds_with_gradient_scores(tmp_path, criterion):
    pl.seed_everything(0)
    cb = MagnitudePruning(final_sparsity=0.5, granularity="2:4", end_epoch=2, criterion=criterion,
                          include="classifier")  # fmt: skip
    make_trainer(tmp_path, callbacks=[cb], max_epochs=3).fit(small_module(), DigitsDataModule())
    for weight in cb.weights.values():
        groups = weight.detach().reshape(-1, 4)
        assert torch.equal((groups != 0).sum(1), torch.full((len(groups),), 2))


@pytest.mark.parametrize("criterion", ["taylor", "movement"])
def test_channel_groups_by_gradient_reach_the_target_and_export_equal(tmp_path, criterion):
    pl.seed_everything(0)
    module = small_module()
    cb = MagnitudePruning(final_sparsity=0.5, granularity="channel", end_epoch=2, criterion=criterion)
    make_trainer(tmp_path, callbacks=[cb], max_epochs=3).fit(module, DigitsDataModule())
    assert cb.channel_sparsity() == pytest.approx(0.5, abs=0.05)
    assert (
        cb.strategy.scored_steps > 0 or criterion == "taylor"
    )  # movement keeps its sums; Taylor restarts at each update
    x = torch.randn(16, 1, 8, 8)
    compact = export_compact(module.net.eval(), x)
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in module.net.parameters())


@pytest.mark.parametrize("granularity", ["unstructured", "channel"])
def test_resume_mid_ramp_keeps_the_scores(tmp_path, granularity):
    def callback():
        return MagnitudePruning(final_sparsity=0.6, end_epoch=3, criterion="taylor", granularity=granularity,
                                update_every_n_steps=7)  # fmt: skip

    pl.seed_everything(0)
    full_module, full_cb = small_module(), callback()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "full", filename="{epoch}", save_top_k=-1)
    make_trainer(tmp_path / "full", callbacks=[full_cb, ckpt], max_epochs=4, enable_checkpointing=True).fit(
        full_module, DigitsDataModule()
    )
    state = torch.load(tmp_path / "full" / "epoch=1.ckpt", weights_only=True)["callbacks"][full_cb.state_key]
    assert state["scored_steps"] > 0  # mid-ramp, between two updates: the scores are saved
    pl.seed_everything(123)
    module, cb = small_module(), callback()
    make_trainer(tmp_path / "resumed", callbacks=[cb], max_epochs=4).fit(
        module, DigitsDataModule(seed=0), ckpt_path=tmp_path / "full" / "epoch=1.ckpt"
    )
    for (name, a), b in zip(full_module.state_dict().items(), module.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("criterion", ["taylor", "movement"])
def test_a_frozen_layer_with_a_gradient_criterion_is_left_dense_and_named(tmp_path, criterion):
    """The one frozen-layer policy of every technique: a layer that gets no gradient is left as it is, said once."""
    module = small_module()
    module.net.features[0].weight.requires_grad_(False)
    cb = MagnitudePruning(criterion=criterion, final_sparsity=0.5, end_epoch=1)
    trainer = make_trainer(tmp_path, callbacks=[cb], max_epochs=2)
    frozen = r"MagnitudePruning leaves 1 frozen layer\(s\) \(weight.requires_grad=False\) as they are: 'net.features.0'"
    with pytest.warns(UserWarning, match=frozen):
        trainer.fit(module, DigitsDataModule())
    assert "net.features.0" not in cb.selected_layers and int((module.net.features[0].weight == 0).sum()) == 0
    assert cb.target_reached and cb.sparsity() == pytest.approx(0.5, abs=1e-3)
    assert cb.strategy.scored_steps > 0 or criterion == "taylor"


def test_movement_on_channel_groups_with_a_global_ranking_is_refused():
    with pytest.raises(ValueError, match=r"criterion='movement' with granularity='channel' ranks each group on"):
        MagnitudePruning(criterion="movement", granularity="channel", scope="global")
