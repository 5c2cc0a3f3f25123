"""MagnitudePruning in real Trainer runs on the embedded digits data."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import assert_same_on_every_rank, make_trainer, small_module
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_compress import MagnitudePruning, compression_summary
from lightning_compress.core.schedules import sparsity_at


class Probe(Callback):
    """Runs after MagnitudePruning: records every optimizer step and checks pruned weights are zero."""

    def __init__(self, pruning: MagnitudePruning):
        self.pruning, self.steps, self.updates = pruning, [], []
        self._last_update = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        p = self.pruning
        for name, mask in p.masks.items():
            weight = p.weights[name]
            assert torch.count_nonzero(weight[~mask]) == 0, f"pruned weights of {name} revived"
        self.steps.append(trainer.global_step)
        if p._last_update_step != self._last_update:
            self._last_update = p._last_update_step
            self.updates.append((p._last_update_step, p._target, p.sparsity()))
            self.smallest_kept = min(float(m[m != 0].abs().min()) for m in p.weights.values())


def zeros_per_layer(cb: MagnitudePruning) -> dict[str, int]:
    return {n: w.numel() - int(torch.count_nonzero(w)) for n, w in cb.weights.items()}


def fit(tmp_path, cb, module=None, datamodule=None, **trainer_kwargs):
    from lightning_compress.tasks import DigitsDataModule

    module = module or small_module()
    datamodule = datamodule or DigitsDataModule(seed=0)
    trainer = make_trainer(tmp_path, callbacks=[cb, *trainer_kwargs.pop("callbacks", [])], **trainer_kwargs)
    trainer.fit(module, datamodule)
    return trainer, module, datamodule


@pytest.mark.parametrize(
    ("kwargs", "per_layer"),
    [
        (dict(final_sparsity=0.9), False),
        (dict(final_sparsity=0.8, scope="layer"), True),
        (dict(final_sparsity=0.5, granularity="2:4", exclude=r"features\.0$"), True),
    ],
    ids=["global-90", "layer-80", "2:4"],
)
def test_exact_final_sparsity_and_accuracy(tmp_path, kwargs, per_layer):
    pl.seed_everything(0)
    cb = MagnitudePruning(end_epoch=4, **kwargs)
    trainer, module, dm = fit(tmp_path, cb, max_epochs=6)
    s = kwargs["final_sparsity"]
    zeros = zeros_per_layer(cb)
    if per_layer:
        for name, w in cb.weights.items():
            expected = round(s * w.shape[0]) * w[0].numel() if "channel" in str(kwargs) else round(s * w.numel())
            assert zeros[name] == expected, name
    else:
        total = sum(w.numel() for w in cb.weights.values())
        assert sum(zeros.values()) == round(s * total)
    if kwargs.get("granularity") == "2:4":
        for name, w in cb.weights.items():
            assert (w.reshape(-1, 4).ne(0).sum(1) <= 2).all(), name
    accuracy = trainer.test(module, dm, verbose=False)[0]["test/acc"]
    assert accuracy > 0.85


def test_schedule_counts_optimizer_steps_with_accumulation_and_fractional_epochs(tmp_path):
    pl.seed_everything(0)
    cb = MagnitudePruning(
        final_sparsity=0.8, initial_sparsity=0.1, start_epoch=0.5, end_epoch=2.5, update_every_n_steps=3
    )
    probe = Probe(cb)
    trainer, _, _ = fit(tmp_path, cb, max_epochs=4, accumulate_grad_batches=2, callbacks=[probe])
    per_epoch = math.ceil(trainer.num_training_batches / 2)
    start, end = round(0.5 * per_epoch), round(2.5 * per_epoch)
    expected_steps = sorted({*range(start, end + 1, 3), end})
    assert [u[0] for u in probe.updates] == expected_steps
    total = sum(w.numel() for w in cb.weights.values())
    for step, target, measured in probe.updates:
        assert target == pytest.approx(sparsity_at((step - start) / (end - start), 0.1, 0.8))
        assert abs(measured - target) <= 1 / total
    assert trainer.global_step == 4 * per_epoch  # accumulation: one optimizer step per two batches
    assert cb.sparsity() == pytest.approx(0.8, abs=1 / total)  # and it holds after end_epoch


def test_pruned_weights_stay_zero_with_momentum_and_weight_decay(tmp_path):
    pl.seed_everything(0)
    cb = MagnitudePruning(final_sparsity=0.7, end_epoch=2, update_every_n_steps=5)
    probe = Probe(cb)  # asserts after every optimizer step
    fit(
        tmp_path,
        cb,
        module=small_module(optimizer="sgd", lr=0.05, weight_decay=0.05),
        max_epochs=3,
        callbacks=[probe],
    )
    assert len(probe.steps) > 40


def test_checkpoint_loads_strict_into_unmodified_class_and_weights_only(tmp_path):
    pl.seed_everything(0)
    cb = MagnitudePruning(final_sparsity=0.9, end_epoch=2)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    trainer, module, _ = fit(tmp_path, cb, max_epochs=3, callbacks=[ckpt_cb], enable_checkpointing=True)
    plain = small_module()
    assert set(module.state_dict()) == set(plain.state_dict())
    ckpt = torch.load(ckpt_cb.best_model_path, weights_only=True)
    plain.load_state_dict(ckpt["state_dict"], strict=True)
    for name in cb.selected_layers:
        w = plain.get_submodule(name).weight
        assert torch.equal(w == 0, ~cb.masks[name])
    state = ckpt["callbacks"][cb.state_key]
    assert set(state["masks"]) == set(cb.selected_layers) and state["masks"]["net.features.3"].dtype == torch.bool


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_channel_groups_are_removed_whole_and_export_compact_is_exact(tmp_path, scope):
    from lightning_compress import export_compact

    pl.seed_everything(0)
    cb = MagnitudePruning(final_sparsity=0.5, granularity="channel", scope=scope, end_epoch=4)
    trainer, module, dm = fit(tmp_path, cb, max_epochs=5)
    keys = {k: v.shape for k, v in small_module().state_dict().items()}
    assert {k: v.shape for k, v in module.state_dict().items()} == keys  # trained in the user's shapes
    roots = sorted(g.root for g in cb.groups)
    assert roots == ["net.classifier.1", "net.features.0", "net.features.3", "net.features.7"]  # not the output layer
    channels = sum(g.channels for g in cb.groups)
    assert cb.channel_sparsity() == pytest.approx(int(0.5 * channels) / channels, abs=1 / channels)
    for group in cb.groups:
        assert 1 <= int(cb.group_keep[cb.groups.index(group)].sum()) < group.channels
        if scope == "layer":
            assert int((~cb.group_keep[cb.groups.index(group)]).sum()) == group.channels // 2
    net = module.net
    removed = (~cb.group_keep[[g.root for g in cb.groups].index("net.features.0")]).nonzero().flatten()
    for param in (net.features[0].weight, net.features[1].weight, net.features[1].bias):
        assert param.detach()[removed].eq(0).all()  # the filter with its BatchNorm scale and shift
    dm.setup("test")
    x = next(iter(dm.test_dataloader()))[0]
    compact = export_compact(module, x)
    assert compact.max_abs_difference <= 1e-4
    assert sum(p.numel() for p in compact.parameters()) < 0.5 * sum(p.numel() for p in module.parameters())
    assert trainer.test(module, dm, verbose=False)[0]["test/acc"] > 0.85


def test_channel_groups_resume_mid_schedule_equals_uninterrupted_run(tmp_path):
    from lightning_compress.tasks import DigitsDataModule

    def callback():
        return MagnitudePruning(final_sparsity=0.5, granularity="channel", end_epoch=3, update_every_n_steps=4)

    pl.seed_everything(0)
    full_module, full_cb = small_module(), callback()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "full", filename="{epoch}", save_top_k=-1)
    fit(tmp_path / "full", full_cb, module=full_module, max_epochs=4, callbacks=[ckpt_cb], enable_checkpointing=True)
    pl.seed_everything(123)
    module, cb = small_module(), callback()
    trainer = make_trainer(tmp_path / "resumed", callbacks=[cb], max_epochs=4)
    trainer.fit(module, DigitsDataModule(seed=0), ckpt_path=tmp_path / "full" / "epoch=1.ckpt")
    assert [torch.equal(a, b) for a, b in zip(full_cb.group_keep, cb.group_keep, strict=True)] == [True] * 4
    for (k, a), (_, b) in zip(full_module.state_dict().items(), module.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)


def test_resume_mid_schedule_equals_uninterrupted_run(tmp_path):
    def run(root):
        pl.seed_everything(0)
        module = small_module()
        pl.seed_everything(0)
        cb = MagnitudePruning(final_sparsity=0.9, end_epoch=4, update_every_n_steps=4)
        ckpt_cb = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)
        fit(root, cb, module=module, max_epochs=5, callbacks=[ckpt_cb], enable_checkpointing=True)
        return cb, module

    full_cb, full = run(tmp_path / "full")
    # resume from the end of epoch 2 (mid-ramp) with a differently initialised model and a fresh callback
    pl.seed_everything(123)
    module = small_module()
    pl.seed_everything(0)
    cb = MagnitudePruning(final_sparsity=0.9, end_epoch=4, update_every_n_steps=4)
    from lightning_compress.tasks import DigitsDataModule

    trainer = make_trainer(tmp_path / "resumed", callbacks=[cb], max_epochs=5)
    trainer.fit(module, DigitsDataModule(seed=0), ckpt_path=tmp_path / "full" / "epoch=1.ckpt")
    assert trainer.global_step == full.trainer.global_step
    for name, mask in full_cb.masks.items():
        assert torch.equal(mask, cb.masks[name]), name
    for (k, a), (_, b) in zip(full.state_dict().items(), module.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)


def test_logs_sparsity_target_and_per_layer(tmp_path):
    pl.seed_everything(0)
    cb = MagnitudePruning(final_sparsity=0.6, end_epoch=2)
    logger = CSVLogger(tmp_path, name="csv")
    fit(tmp_path, cb, max_epochs=2, logger=logger, log_every_n_steps=1)
    import csv

    with open(logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    sparsity = [float(r["compress/sparsity"]) for r in rows if r.get("compress/sparsity")]
    target = [float(r["compress/target_sparsity"]) for r in rows if r.get("compress/target_sparsity")]
    assert sparsity[-1] == pytest.approx(0.6, abs=1e-4) and target[-1] == pytest.approx(0.6)
    assert sparsity == sorted(sparsity) and len(sparsity) > 20
    layer_cols = [c for c in rows[0] if c.startswith("compress/layer_sparsity/")]
    assert sorted(layer_cols) == sorted(f"compress/layer_sparsity/{n}" for n in cb.selected_layers)


def test_wandb_offline_run_holds_sparsity_and_layer_table(tmp_path):
    import json

    import wandb
    from lightning.pytorch.loggers import WandbLogger
    from wandb_records import history, run_file

    pl.seed_everything(0)
    cb = MagnitudePruning(final_sparsity=0.75, end_epoch=2)
    logger = WandbLogger(project="lc-test", save_dir=str(tmp_path), offline=True)
    try:
        fit(tmp_path, cb, max_epochs=2, logger=logger, log_every_n_steps=1)
    finally:
        wandb.finish()
    rows = history(run_file(tmp_path))
    logged = [r["compress/sparsity"] for r in rows if "compress/sparsity" in r]
    assert logged[-1] == pytest.approx(0.75, abs=1e-4)
    tables = list(tmp_path.rglob("files/media/table/compress/layers_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert [r[0] for r in table["data"]] == cb.selected_layers
    assert table["columns"] == ["layer", "type", "params", "nonzero", "sparsity", "bytes"]


def test_bf16_mixed_precision(tmp_path):
    pl.seed_everything(0)
    cb = MagnitudePruning(final_sparsity=0.9, end_epoch=2)
    fit(tmp_path, cb, max_epochs=2, precision="bf16-mixed")
    total = sum(w.numel() for w in cb.weights.values())
    assert sum(zeros_per_layer(cb).values()) == round(0.9 * total)


def test_random_criterion_is_reproducible_and_exact(tmp_path):
    masks = []
    for i in range(2):
        pl.seed_everything(i)  # different training noise, same pruning seed
        cb = MagnitudePruning(final_sparsity=0.5, end_epoch=1, criterion="random", seed=7)
        fit(tmp_path / str(i), cb, max_epochs=1)
        masks.append(cb.masks)
    total = sum(m.numel() for m in masks[0].values())
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    assert sum(int((~m).sum()) for m in masks[0].values()) == round(0.5 * total)


def test_threshold_criterion_zeroes_everything_below(tmp_path):
    pl.seed_everything(0)
    cb = MagnitudePruning(criterion="threshold", threshold=0.05, end_epoch=1, update_every_n_steps=5)
    probe = Probe(cb)
    fit(tmp_path, cb, max_epochs=1, callbacks=[probe])
    # right after the last update every weight below the threshold is zero, and the target reported is
    # the measured sparsity
    assert probe.smallest_kept >= 0.05
    step, target, measured = probe.updates[-1]
    assert target == measured and measured > 0.3


def test_layer_sparsity_override(tmp_path):
    pl.seed_everything(0)
    cb = MagnitudePruning(final_sparsity=0.9, end_epoch=2, layer_sparsity={r"classifier\.3": 0.2})
    fit(tmp_path, cb, max_epochs=2)
    head = cb.weights["net.classifier.3"]
    assert head.numel() - int(torch.count_nonzero(head)) == round(0.2 * head.numel())
    rest = [w for n, w in cb.weights.items() if n != "net.classifier.3"]
    zeros = sum(w.numel() - int(torch.count_nonzero(w)) for w in rest)
    assert zeros == round(0.9 * sum(w.numel() for w in rest))


def test_compression_summary_without_trainer():
    module = small_module()
    with torch.no_grad():
        module.net.classifier[3].weight[:5].zero_()
    rows = {r.name: r for r in compression_summary(module)}
    head = rows["net.classifier.3"]
    assert head.params == 32 * 10 + 10 and head.nonzero == head.params - 5 * 32
    assert head.bytes == head.params * 4 and head.sparsity == pytest.approx(160 / 330)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(final_sparsity=1.0), ValueError, r"`final_sparsity` must be in \[0, 1\), got 1.0"),
        (dict(final_sparsity=-0.1), ValueError, r"`final_sparsity` must be in \[0, 1\), got -0.1"),
        (dict(final_sparsity=math.nan), ValueError, r"`final_sparsity` must be in \[0, 1\), got nan"),
        (dict(final_sparsity="0.9"), TypeError, r"`final_sparsity` must be a number"),
        (
            dict(initial_sparsity=0.5, final_sparsity=0.4),
            ValueError,
            r"`initial_sparsity` \(0.5\) must not exceed",
        ),
        (
            dict(start_epoch=5, end_epoch=3),
            ValueError,
            r"`start_epoch` \(5\) must not be after `end_epoch` \(3\)",
        ),
        (dict(start_epoch=-1), ValueError, r"`start_epoch` must be a number of epochs >= 0"),
        (dict(granularity="block"), ValueError, r"`granularity` must be .* got 'block'"),
        (
            dict(schedule="exponential"),
            ValueError,
            r"`schedule` must be one of \('cubic', 'linear'\), got 'exponential'",
        ),
        (
            dict(criterion="fisher"),
            ValueError,
            r"`criterion` must be one of \('magnitude', 'random', 'threshold', 'taylor', 'movement'\), got 'fisher'",
        ),
        (dict(scope="model"), ValueError, r"`scope` must be one of \('global', 'layer'\), got 'model'"),
        (
            dict(granularity="2:4", scope="global", final_sparsity=0.5),
            ValueError,
            r"scope='global'.*N:M patterns are per layer",
        ),
        (
            dict(granularity="channel", scope="global", round_to=8, final_sparsity=0.5),
            ValueError,
            r"`round_to` rounds the channels each group keeps: it needs granularity='channel' and scope='layer'",
        ),
        (
            dict(granularity="channel", criterion="random", final_sparsity=0.5),
            ValueError,
            r"criterion='random' is not offered with granularity='channel'",
        ),
        (
            dict(granularity="2:4"),
            ValueError,
            r"`final_sparsity` must be in \[0, 0.5\] for granularity '2:4', got 0.9",
        ),
        (
            dict(criterion="threshold"),
            ValueError,
            r"criterion='threshold' needs a finite `threshold` > 0, got None",
        ),
        (dict(threshold=0.1), ValueError, r"`threshold` \(0.1\) is only used with criterion='threshold'"),
        (
            dict(layer_sparsity={"fc": 1.5}),
            ValueError,
            r"`layer_sparsity\['fc'\]` must be in \[0, 1\), got 1.5",
        ),
        (
            dict(update_every_n_steps=0),
            ValueError,
            r"`update_every_n_steps` must be an integer >= 1 or None, got 0",
        ),
    ],
)
def test_bad_arguments_refused_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        MagnitudePruning(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "trainer_kwargs", "message"),
    [
        (
            dict(end_epoch=12),
            dict(max_epochs=10),
            r"MagnitudePruning\(end_epoch=12\) is past the end of Trainer\(max_epochs=10\)",
        ),
        (
            dict(end_epoch=1, include=["classifier", "decoder"]),
            {},
            r"`include` pattern 'decoder' matches no .*Candidates: 'net.features.0'",
        ),
        (
            dict(end_epoch=1, granularity="2:4", final_sparsity=0.5),
            {},
            r"granularity='2:4' cannot prune 1 layer\(s\) .*'net.features.0': input size 9"
            r".*exclude=\['\^net\\\\.features\\\\.0\$'\]",
        ),
        (
            dict(end_epoch=1, layer_sparsity={"decoder": 0.5}),
            {},
            r"`layer_sparsity` pattern 'decoder' matches no selected layer",
        ),
    ],
)
def test_bad_setup_refused_before_first_step(tmp_path, kwargs, trainer_kwargs, message):
    module = small_module()
    before = copy.deepcopy(module.state_dict())
    trainer = make_trainer(tmp_path, callbacks=[MagnitudePruning(**kwargs)], **{"max_epochs": 3, **trainer_kwargs})
    from lightning_compress.tasks import DigitsDataModule

    with pytest.raises(ValueError, match=message):
        trainer.fit(module, DigitsDataModule())
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_model_without_prunable_weights(tmp_path):
    from torch import nn

    from lightning_compress.tasks import ClassificationModule, DigitsDataModule

    class NoWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x.flatten(1)[:, :10] * self.scale

    trainer = make_trainer(tmp_path, callbacks=[MagnitudePruning(end_epoch=1)], max_epochs=1)
    with pytest.raises(
        ValueError, match="No Conv1d/Conv2d/Conv3d/Linear module is left to compress in ClassificationModule"
    ):
        trainer.fit(ClassificationModule(NoWeights()), DigitsDataModule())


def test_non_finite_weights_stop_training_at_mask_update(tmp_path):
    class Poison(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 8:  # runs just before MagnitudePruning's update after step 8
                with torch.no_grad():
                    pl_module.net.features[3].weight[0, 0, 0, 0] = math.nan

    cb = MagnitudePruning(final_sparsity=0.5, end_epoch=2, update_every_n_steps=4)
    trainer = make_trainer(tmp_path, callbacks=[Poison(), cb], max_epochs=3)
    from lightning_compress.tasks import DigitsDataModule

    with pytest.raises(
        RuntimeError, match=r"stopped training at optimizer step 8: layer 'net.features.3' holds non-finite"
    ):
        trainer.fit(small_module(), DigitsDataModule())
    assert trainer.global_step == 8


class _SameMasksOnEveryRank(Callback):
    def on_train_end(self, trainer, pl_module):
        pruning = next(c for c in trainer.callbacks if isinstance(c, MagnitudePruning))
        assert_same_on_every_rank(trainer, pruning.masks.values())
        assert_same_on_every_rank(trainer, pruning.weights.values())


@pytest.mark.slow
def test_ddp_spawn_two_processes_identical_masks(tmp_path):
    from lightning_compress.tasks import DigitsDataModule

    pl.seed_everything(0)
    cb = MagnitudePruning(final_sparsity=0.8, end_epoch=2)
    module = small_module()
    trainer = make_trainer(
        tmp_path, callbacks=[cb, _SameMasksOnEveryRank()], max_epochs=2, strategy="ddp_spawn", devices=2
    )
    trainer.fit(module, DigitsDataModule())
    # rank zero's weights come back to this process: exactly 80 % of the selected weights are zero
    weights = [
        module.get_submodule(n).weight
        for n in (
            "net.features.0",
            "net.features.3",
            "net.features.7",
            "net.classifier.1",
            "net.classifier.3",
        )
    ]
    total = sum(w.numel() for w in weights)
    assert sum(w.numel() - int(torch.count_nonzero(w)) for w in weights) == round(0.8 * total)


def test_channel_groups_all_blocked_by_a_normalization_are_named_and_refused_before_the_first_step(tmp_path):
    from torch import nn

    from lightning_compress.tasks import ClassificationModule

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm, self.out = nn.Conv2d(1, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 10, 3)

        def forward(self, x):
            return self.out(self.norm(self.conv(x))).mean((2, 3))

    module = ClassificationModule(Net())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    cb = MagnitudePruning(final_sparsity=0.5, granularity="channel", end_epoch=1)
    with (
        pytest.warns(UserWarning, match=r"stay dense .*'net.conv' \(through 'net.norm', GroupNorm\)"),
        pytest.raises(ValueError, match="no channel group to prune"),
    ):
        fit(tmp_path, cb, module=module, max_epochs=1)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())  # no step was taken


class _SameGroupsOnEveryRank(Callback):
    def on_train_end(self, trainer, pl_module):
        pruning = next(c for c in trainer.callbacks if isinstance(c, MagnitudePruning))
        assert pruning.channel_sparsity() == pytest.approx(0.5, abs=0.01)
        assert_same_on_every_rank(trainer, [k.float() for k in pruning.group_keep])
        assert_same_on_every_rank(trainer, list(pl_module.parameters()))


@pytest.mark.slow
def test_ddp_spawn_channel_groups_identical_on_every_rank(tmp_path):
    pytest.importorskip("torch_pruning")
    from lightning_compress.tasks import DigitsDataModule

    pl.seed_everything(0)
    cb = MagnitudePruning(final_sparsity=0.5, granularity="channel", end_epoch=2)
    trainer = make_trainer(
        tmp_path, callbacks=[cb, _SameGroupsOnEveryRank()], max_epochs=2, strategy="ddp_spawn", devices=2
    )
    trainer.fit(small_module(), DigitsDataModule())
