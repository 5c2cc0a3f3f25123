"""Low-rank factorization: projection, the global rank choice under a budget, the callback (shapes kept, resume exact,
DDP identical, bad input refused before the first step) and the factorized export (proven equal)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import assert_same_on_every_rank, make_trainer, small_module
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_compress import LowRankFactorization, export_compact, low_rank_
from lightning_compress.core.lowrank import LowRankLayer, choose_ranks, layer_info, normalized_spectrum, project_rank_
from lightning_compress.export.compact import factorize
from lightning_compress.export.onnx import ExportMismatchError


def _rank(weight: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(weight.detach().reshape(weight.shape[0], -1).double(), rtol=1e-5))


# --------------------------------------------------------------------------- pure parts
def test_projection_is_the_best_rank_r_approximation_and_keeps_the_shape():
    torch.manual_seed(0)
    weight = torch.randn(16, 8, 3, 3)
    matrix = weight.reshape(16, -1)
    projected = project_rank_(weight.clone(), 5)
    assert projected.shape == weight.shape and _rank(projected) == 5
    s = torch.linalg.svdvals(matrix)
    # Eckart–Young: the Frobenius error of the best rank-5 approximation is the norm of the dropped singular values
    torch.testing.assert_close((projected.reshape(16, -1) - matrix).norm(), s[5:].norm(), rtol=1e-4, atol=1e-5)
    same = weight.clone()
    assert torch.equal(project_rank_(same, 16), weight)  # at full rank: untouched


def test_global_choice_meets_the_budget_and_favours_the_layer_with_the_concentrated_spectrum():
    torch.manual_seed(0)
    low = torch.randn(64, 4) @ torch.randn(4, 64) + 0.01 * torch.randn(64, 64)  # nearly rank 4
    high = torch.randn(64, 64)  # spread spectrum
    layers = [LowRankLayer("low", 64, 64), LowRankLayer("high", 64, 64)]
    spectra = {"low": normalized_spectrum(low), "high": normalized_spectrum(high)}
    ranks = choose_ranks(layers, spectra, keep=0.5)
    cost = sum(layer.cost(ranks[layer.name]) for layer in layers)
    assert cost <= 0.5 * 2 * 64 * 64
    assert ranks["low"] == 4 and ranks["high"] > 4
    # a rank at or above the break-even (31 for 64×64) is dense: reported as full rank, costed as dense
    assert choose_ranks(layers, spectra, keep=1.0) == {"low": 64, "high": 64}


def test_an_unmeetable_budget_is_refused_with_its_figures():
    layers = [LowRankLayer("a", 64, 64)]
    with pytest.raises(ValueError, match=r"budget cannot be met: keeping 0.001 .* below what rank 1 in every layer"):
        choose_ranks(layers, {"a": torch.ones(64) / 8}, keep=0.001)


def test_layers_that_cannot_be_factorized_are_named():
    with pytest.raises(ValueError, match=r"'g' is a grouped convolution \(groups=2\).*`exclude`"):
        layer_info("g", nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"'thin' has a 1×64 weight matrix: even rank 1"):
        layer_info("thin", nn.Linear(64, 1))


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.Linear(48, 40), (5, 48)),
        (nn.Conv2d(6, 12, 3, stride=2, padding=2, dilation=2), (5, 6, 11, 11)),
        (nn.Conv1d(6, 12, 5, padding=2, padding_mode="circular"), (5, 6, 20)),
    ],
    ids=["linear", "conv2d-stride-dilation", "conv1d-circular"],
)
def test_factorized_layer_computes_what_the_low_rank_layer_computes(layer, shape):
    torch.manual_seed(0)
    project_rank_(layer.weight, 3)
    pair = factorize(layer, 3, "layer")
    x = torch.randn(shape)
    torch.testing.assert_close(pair(x), layer(x), rtol=0, atol=1e-5)
    assert sum(p.numel() for p in pair.parameters()) < sum(p.numel() for p in layer.parameters())
    assert pair[0].weight.shape[0] == 3


def test_factorize_refuses_a_rank_out_of_range():
    with pytest.raises(ValueError, match=r"rank 0 for layer 'fc' \(16×16\) must be in \[1, 7\]"):
        factorize(nn.Linear(16, 16), 0, "fc")
    with pytest.raises(ValueError, match=r"rank 8 for layer 'fc' \(16×16\) must be in \[1, 7\] \(full rank 16"):
        factorize(nn.Linear(16, 16), 8, "fc")


# --------------------------------------------------------------------------- Trainer-free form and export
def test_low_rank_then_export_compact_is_smaller_and_equal():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 64), nn.ReLU(),
                        nn.Linear(64, 10))  # fmt: skip
    dense = sum(m.weight.numel() for m in net if isinstance(m, (nn.Conv2d, nn.Linear)))
    ranks = low_rank_(net, ratio=4)
    x = torch.randn(32, 3, 8, 8)
    compact = export_compact(net, x[:4], check_inputs=[x], ranks=ranks, channels=False)
    assert compact.max_abs_difference <= 1e-4
    assert isinstance(compact[3], nn.Sequential)  # the big Linear is now two
    weights = sum(m.weight.numel() for m in compact.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert weights <= dense / 4
    assert [k for k in net.state_dict()] == [k for k in nn.Sequential(*net).state_dict()]  # the model kept its keys


def test_flops_budget_counts_output_positions():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16 * 16, 32))
    x = torch.randn(2, 8, 16, 16)
    ranks = low_rank_(net, ratio=3, budget="flops", example_input=x)
    macs = {"0": (32 * 72, 256), "3": (32 * 8192, 1)}
    dense = sum(a * p for a, p in macs.values())
    rows = {"0": (32, 72), "3": (32, 8192)}
    spent = sum((ranks[n] * sum(rows[n]) if n in ranks else macs[n][0]) * macs[n][1] for n in macs)
    assert spent <= dense / 3
    with pytest.raises(ValueError, match="budget in FLOPs traces the model on one input"):
        low_rank_(net, ratio=3, budget="flops")


def test_export_compact_refuses_unknown_layers_and_a_layer_that_is_not_low_rank():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 32)
    with pytest.raises(ValueError, match=r"`ranks` names layers the model does not have: \['fc'\]"):
        export_compact(net, x, ranks={"fc": 2}, channels=False)
    with pytest.raises(ExportMismatchError, match="differ from the model's by up to"):
        export_compact(net, x, ranks={"0": 2}, channels=False)  # full-rank weights: the factors are not equal


def test_channel_groups_and_low_rank_export_together():
    pytest.importorskip("torch_pruning")
    from lightning_compress.pruning import prune_channel_groups_

    torch.manual_seed(0)
    model = small_module(width=8, hidden=32).net.eval()
    x = torch.randn(16, 1, 8, 8)
    prune_channel_groups_(model, x[:2], 0.5)
    ranks = low_rank_(model, ratio=2, include=r"classifier\.1$")
    compact = export_compact(model, x[:2], check_inputs=[x], ranks=ranks)
    assert compact.max_abs_difference <= 1e-4
    assert isinstance(compact.classifier[1], nn.Sequential) and compact.features[0].out_channels < 8


# --------------------------------------------------------------------------- the callback
class _Probe(Callback):
    """After every optimizer step (after LowRankFactorization): each layer is at its rank, shapes are the user's."""

    def __init__(self, low_rank: LowRankFactorization, shapes: dict[str, torch.Size]):
        self.low_rank, self.shapes, self.ratios = low_rank, shapes, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, rank in self.low_rank.ranks.items():
            assert _rank(pl_module.get_submodule(name).weight) <= rank, name
        assert {k: v.shape for k, v in pl_module.state_dict().items()} == self.shapes
        self.ratios.append(self.low_rank.ratio_reached())


def _fit(tmp_path, cb, module=None, **kwargs):
    from lightning_compress.tasks import DigitsDataModule

    module = module or small_module(width=8, hidden=64)
    trainer = make_trainer(tmp_path, callbacks=[cb, *kwargs.pop("callbacks", [])], **kwargs)
    trainer.fit(module, DigitsDataModule(seed=0))
    return trainer, module


def test_callback_reaches_the_ratio_gradually_keeps_shapes_and_exports_equal(tmp_path):
    pl.seed_everything(0)
    module = small_module(width=8, hidden=64)
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    cb = LowRankFactorization(ratio=4, include=r"classifier\.1$", end_epoch=3)
    probe = _Probe(cb, shapes)
    trainer, module = _fit(tmp_path, cb, module, max_epochs=4, callbacks=[probe])
    assert cb.target_reached and cb.ratio_reached() >= 4
    assert probe.ratios[0] < 1.5 and probe.ratios == sorted(probe.ratios)  # gradual, never loosened
    (name, rank), = cb.ranks.items()  # fmt: skip
    assert name == "net.classifier.1" and 1 <= rank <= 64 * 256 // (4 * (64 + 256))
    from lightning_compress.tasks import DigitsDataModule

    dm = DigitsDataModule(seed=0)
    dm.setup("test")
    batches = [x for x, _ in dm.test_dataloader()]
    compact = export_compact(module.net, batches[0], check_inputs=batches, ranks={"classifier.1": rank})
    assert compact.max_abs_difference <= 1e-4
    assert trainer.test(module, dm, verbose=False)[0]["test/acc"] > 0.8


def test_resume_mid_ramp_equals_the_uninterrupted_run(tmp_path):
    def callback():
        return LowRankFactorization(ratio=3, end_epoch=3, update_every_n_steps=4, exclude=r"classifier\.3$")

    pl.seed_everything(0)
    full_module, full_cb = small_module(width=8, hidden=64), callback()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "full", filename="{epoch}", save_top_k=-1)
    _fit(tmp_path / "full", full_cb, full_module, max_epochs=4, callbacks=[ckpt], enable_checkpointing=True)
    pl.seed_everything(123)
    module, cb = small_module(width=8, hidden=64), callback()
    from lightning_compress.tasks import DigitsDataModule

    trainer = make_trainer(tmp_path / "resumed", callbacks=[cb], max_epochs=4)
    trainer.fit(module, DigitsDataModule(seed=0), ckpt_path=tmp_path / "full" / "epoch=1.ckpt")
    assert cb.ranks == full_cb.ranks and cb.ranks
    for (k, a), (_, b) in zip(full_module.state_dict().items(), module.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)


def test_one_shot_is_start_equal_to_end(tmp_path):
    cb = LowRankFactorization(ratio=4, include=r"classifier\.1$", start_epoch=1, end_epoch=1)
    probe = _Probe(cb, {k: v.shape for k, v in small_module(width=8, hidden=64).state_dict().items()})
    _fit(tmp_path, cb, max_epochs=2, callbacks=[probe])
    steps = len(probe.ratios) // 2
    assert probe.ratios[: steps - 1] == [1.0] * (steps - 1) and min(probe.ratios[steps:]) >= 4


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(ratio=1.0), r"`ratio` must be a finite number > 1, got 1.0"),
        (dict(layer_rank={"fc": 0}), r"`layer_rank\['fc'\]` must be an integer >= 1"),
        (dict(budget="bytes"), r"`budget` must be one of"),
    ],
    ids=["ratio-1", "rank-0", "budget"],
)  # fmt: skip
def test_bad_arguments_are_refused_at_construction(kwargs, error):
    with pytest.raises(ValueError, match=error):
        LowRankFactorization(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(ratio=4, include=r"classifier\.1$", layer_rank={r"classifier\.1$": 60}),
         r"layer_rank 60 for layer 'net.classifier.1' \(64×256\) must be in \[1, 51\]"),
        (dict(ratio=4, include=r"classifier\.1$", layer_rank={"nothing": 2}), r"`layer_rank` pattern 'nothing'"),
        (dict(ratio=400, include=r"classifier\.1$"), r"ratio=400\): the low-rank budget cannot be met"),
        (dict(ratio=2, include="nothing"), r"`include` pattern 'nothing'|No .* module is left"),
    ],
    ids=["rank-above-break-even", "pattern", "unmeetable", "include"],
)  # fmt: skip
def test_bad_input_is_refused_before_the_first_step(tmp_path, kwargs, error):
    module = small_module(width=8, hidden=64)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=error):
        _fit(tmp_path, LowRankFactorization(**kwargs, end_epoch=1), module, max_epochs=1)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_frozen_and_grouped_layers_are_refused_with_their_names(tmp_path):
    module = small_module(width=8, hidden=64)
    module.net.classifier[1].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"every selected layer is frozen .*: 'net.classifier.1'.* `exclude`"):
        _fit(tmp_path, LowRankFactorization(ratio=2, include=r"classifier\.1$", end_epoch=1), module, max_epochs=1)
    from lightning_compress.tasks import ClassificationModule

    grouped = ClassificationModule(nn.Sequential(nn.Conv2d(1, 8, 3, groups=1), nn.Conv2d(8, 8, 3, groups=2),
                                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)))  # fmt: skip
    with pytest.raises(ValueError, match=r"'net.1' is a grouped convolution"):
        _fit(tmp_path, LowRankFactorization(ratio=2, include=r"net\.1$", end_epoch=1), grouped, max_epochs=1)


def test_grouped_and_depthwise_convolutions_are_left_as_they_are_named_in_one_warning(tmp_path):
    from lightning_compress.tasks import ClassificationModule

    def mobile_like():  # a MobileNet-style stack: two depthwise convolutions between ungrouped ones
        return ClassificationModule(nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
            nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 64, 10)))  # fmt: skip

    listed = r"2 grouped or depthwise convolution\(s\) as they are .*'net.2', 'net.6'\."
    module = mobile_like()
    with pytest.warns(UserWarning, match=listed) as caught:
        low_rank = LowRankFactorization(ratio=2, end_epoch=1)
        _fit(tmp_path, low_rank, module, max_epochs=2)
    assert sum("grouped or depthwise" in str(w.message) for w in caught) == 1  # one warning, every layer named
    assert {layer.name for layer in low_rank._layers} == {"net.0", "net.4", "net.9"}  # what it chose ranks among
    assert low_rank.ranks and set(low_rank.ranks) <= {"net.0", "net.4", "net.9"}
    x = torch.randn(4, 1, 8, 8)
    compact = export_compact(module.net, x)
    assert compact[2].groups == 16 and compact[6].groups == 32  # left as they were
    with pytest.warns(UserWarning, match=listed):  # the verb says the same
        ranks = low_rank_(mobile_like(), ratio=2)
    assert ranks and set(ranks) <= {"net.0", "net.4", "net.9"}


class _SameRanksOnEveryRank(Callback):
    def on_train_end(self, trainer, pl_module):
        low_rank = next(c for c in trainer.callbacks if isinstance(c, LowRankFactorization))
        ranks = torch.tensor(list(low_rank.ranks.values()), dtype=torch.float32)
        assert ranks.numel() > 0
        assert_same_on_every_rank(trainer, [ranks, *(p for p in pl_module.parameters())])


@pytest.mark.slow
def test_ddp_spawn_two_processes_identical_ranks_and_weights(tmp_path):
    from lightning_compress.tasks import DigitsDataModule

    pl.seed_everything(0)
    cb = LowRankFactorization(ratio=3, end_epoch=2, exclude=r"classifier\.3$")
    module = small_module(width=8, hidden=64)
    trainer = make_trainer(
        tmp_path, callbacks=[cb, _SameRanksOnEveryRank()], max_epochs=2, strategy="ddp_spawn", devices=2
    )
    trainer.fit(module, DigitsDataModule())


@pytest.mark.slow
def test_the_app_writes_the_factorized_network_checked_on_the_test_split(tmp_path):
    import json

    from test_cli import run_app

    run_dir = tmp_path / "run"
    run_app(
        tmp_path, "recipe=digits_lowrank4", f"hydra.run.dir={run_dir}", "trainer.max_epochs=2",
        "compression.low_rank.end_epoch=1", "logger=none", "trainer.enable_progress_bar=false",
    )  # fmt: skip
    report = json.loads((run_dir / "report.json").read_text())
    compact = report["compact"]
    assert compact["max_abs_difference"] <= 1e-4 and compact["onnx_path"] == "model.compact.onnx"
    linear = 1024 * 128 + 128 * 10  # the small CNN's Linear weights: 4x fewer of them in the compact network
    assert report["params"] - compact["params"] >= 0.75 * linear - 1
    net = torch.load(run_dir / "model.compact.pt", weights_only=False)
    assert isinstance(net.net.classifier[1], nn.Sequential)  # the LightningModule, its Linear now two
