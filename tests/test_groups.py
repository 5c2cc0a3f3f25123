"""Channel groups (Torch-Pruning's dependency graph) and the compact export: removing a group is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress import export_compact
from lightning_compress.analysis.report import flops_per_sample
from lightning_compress.pruning import prune_channel_groups_
from lightning_compress.pruning.groups import apply_group_masks_, channel_groups, group_keep, group_scores
from lightning_compress.tasks import CNN1D, ResNet20

pytest.importorskip("torch_pruning")


def _trained_like(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and shifts, so that a channel left with its BatchNorm shift would show."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


class Branches(nn.Module):
    """Concatenation, a depthwise convolution and a residual addition in one small network (and, with ``grouped``, a
    grouped convolution in the residual branch)."""

    def __init__(self, grouped: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.left = nn.Conv2d(8, 8, 1)
        self.right = nn.Conv2d(8, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2 if grouped else 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        x = torch.relu(self.bn(self.depthwise(x)))
        return self.head(x + self.grouped(x))


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: ResNet20((3, 16, 16), 10, width=8), (8, 3, 16, 16)),
        (lambda: CNN1D(), (8, 1, 40)),
        (Branches, (8, 3, 12, 12)),
    ],  # fmt: skip
    ids=["resnet-residuals", "conv1d-flatten-linear", "concat-depthwise-residual"],
)
def test_removing_half_the_channels_by_group_is_exact(make, shape):
    model = _trained_like(make())
    x = torch.randn(*shape)
    keys = {k: v.shape for k, v in model.state_dict().items()}
    groups = channel_groups(model, x)
    keep = group_keep(groups, group_scores(groups), 0.5)
    apply_group_masks_(groups, keep)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys  # trained in the user's shapes
    compact = export_compact(model, x)
    assert compact.max_abs_difference <= 1e-4
    torch.testing.assert_close(compact(x), model(x), atol=1e-4, rtol=0)
    assert sum(p.numel() for p in compact.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    assert flops_per_sample(compact, x) < 0.6 * flops_per_sample(model, x)


def test_a_group_through_a_grouped_convolution_is_not_offered():
    x = torch.randn(2, 3, 12, 12)
    plain = {g.root for g in channel_groups(Branches(), x)}
    with pytest.warns(UserWarning, match="grouped convolution 'grouped'.*they stay"):
        grouped = {g.root for g in channel_groups(Branches(grouped=True), x)}
    assert "grouped" in plain and "grouped" not in grouped and "stem.0" in grouped


def test_a_group_is_never_emptied_and_the_output_layer_keeps_its_outputs():
    model = _trained_like(ResNet20((3, 16, 16), 10, width=4))
    x = torch.randn(2, 3, 16, 16)
    groups = channel_groups(model, x)
    assert all(g.root != "fc" for g in groups)
    keep = group_keep(groups, group_scores(groups), 0.99)
    assert all(int(k.sum()) >= 1 for k in keep)
    apply_group_masks_(groups, keep)
    compact = export_compact(model, x)
    assert compact(x).shape == (2, 10)


def test_a_filter_zeroed_by_hand_without_its_batchnorm_is_refused():
    model = _trained_like(ResNet20((3, 16, 16), 10, width=4))
    with torch.no_grad():
        model.features[0].weight[1].zero_()  # the filter, not its BatchNorm shift: not a removable channel
    with pytest.raises(
        ValueError, match=r"channel 1 of 'features.0' is zero there but not in the layers it is coupled"
    ):
        export_compact(model, torch.randn(2, 3, 16, 16))


def test_layers_left_out_keep_their_group():
    model = ResNet20((3, 16, 16), 10, width=4)
    x = torch.randn(2, 3, 16, 16)
    roots = {g.root for g in channel_groups(model, x)}
    kept = {g.root for g in channel_groups(model, x, exclude=r"features\.0$")}
    assert "features.0" in roots and "features.0" not in kept
    assert len(kept) < len(roots)  # the stem's residual stream is coupled with it: that group goes too


class WithNorms(nn.Module):
    """A stem whose channels reach a normalization over channels (as a transformer's residual width reaches its
    LayerNorms), then an inner pair of convolutions whose channels can be cut exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.GroupNorm(2, 8)
        self.mid = nn.Conv2d(8, 16, 3)
        self.out = nn.Conv2d(16, 4, 3)

    def forward(self, x):
        return self.out(torch.relu(self.mid(self.norm(self.conv(x))))).mean((2, 3))


def test_groups_that_reach_a_normalization_stay_dense_with_one_warning_and_the_rest_is_pruned_and_cut():
    model, x = WithNorms().eval(), torch.randn(2, 3, 12, 12)
    with pytest.warns(UserWarning, match=r"1 group\(s\) stay dense .*'conv' \(through 'norm', GroupNorm\)"):
        groups = channel_groups(model, x)
    assert [g.root for g in groups] == ["mid"]
    from lightning_compress import prune_

    with pytest.warns(UserWarning, match="stay dense"):
        prune_(model, final_sparsity=0.5, granularity="channel", example_input=x)
    compact = export_compact(model, x)  # cuts the group prune_ pruned: it never refuses what the technique accepted
    assert compact.mid.out_channels == 8 and compact.out.in_channels == 8 and compact.conv.out_channels == 8


def test_one_shot_prune_then_compact_on_the_mnist1d_cnn():
    from lightning_compress.pruning import prune_channel_groups_

    model = _trained_like(CNN1D())
    x = torch.randn(16, 1, 40)
    groups, keep = prune_channel_groups_(model, x, 0.5, scope="layer")
    with torch.no_grad():  # a fine-tuning step revives the zeroed channels; re-applying the masks removes them again
        for p in model.parameters():
            p.add_(0.01)
    apply_group_masks_(groups, keep)
    assert sorted(g.root for g in groups) == ["features.0", "features.3", "features.6"]
    assert all(int(model.features[i].weight.flatten(1).abs().sum(1).eq(0).sum()) == 12 for i in (0, 3, 6))
    compact = export_compact(model, x)
    assert [compact.features[i].out_channels for i in (0, 3, 6)] == [13, 13, 13]
    with pytest.raises(ValueError, match="no channel group to prune"):
        prune_channel_groups_(CNN1D(), x, 0.5, exclude=r"features")


def test_round_to_keeps_multiples_of_the_block_and_stays_exact():
    model = _trained_like(ResNet20((3, 16, 16), 10, width=16))
    x = torch.randn(4, 3, 16, 16)
    groups, keep = prune_channel_groups_(model, x, 0.32, scope="layer", round_to=8)
    assert sorted(int(k.sum()) for k in keep) == sorted(max(8, round((g.channels - int(0.32 * g.channels)) / 8) * 8)
                                                        for g in groups)  # fmt: skip
    assert all(int(k.sum()) % 8 == 0 for k in keep)
    compact = export_compact(model, x)
    assert compact.max_abs_difference <= 1e-4
    assert {m.out_channels for m in compact.modules() if isinstance(m, nn.Conv2d)} <= {8, 16, 24, 32, 40, 48, 56, 64}
    with pytest.raises(ValueError, match="round_to.*needs scope='layer'"):
        group_keep(groups, group_scores(groups), 0.5, scope="global", round_to=8)


def test_bad_amounts_are_refused():
    model = ResNet20((3, 16, 16), 10, width=4)
    groups = channel_groups(model, torch.randn(2, 3, 16, 16))
    scores = group_scores(groups)
    with pytest.raises(ValueError, match="sparsity"):
        group_keep(groups, scores, 1.0)
    with pytest.raises(ValueError, match="`scope` must be 'global' or 'layer'"):
        group_keep(groups, scores, 0.5, scope="model")


@pytest.mark.slow
def test_the_app_writes_the_compact_network_checked_on_the_test_split(tmp_path):
    import json

    from test_cli import run_app

    run_dir = tmp_path / "run"
    run_app(
        tmp_path, "recipe=digits_channel50", f"hydra.run.dir={run_dir}", "trainer.max_epochs=2",
        "compression.pruning.end_epoch=1", "logger=none", "trainer.enable_progress_bar=false",
    )  # fmt: skip
    report = json.loads((run_dir / "report.json").read_text())
    compact = report["compact"]
    assert compact["max_abs_difference"] <= 1e-4
    assert compact["params"] < 0.3 * report["params"] and compact["flops_per_sample"] < 0.3 * report["flops_per_sample"]
    assert compact["latency_ms_batch1"] > 0 and compact["throughput_per_s"] > 0
    net = torch.load(run_dir / "model.compact.pt", weights_only=False)
    assert sum(p.numel() for p in net.parameters()) == compact["params"]
    assert (run_dir / "model.compact.onnx").stat().st_size == compact["size_bytes_onnx"]


@pytest.mark.parametrize("observer", ["minmax", "lsq"])
def test_compact_export_of_a_quantization_aware_model_keeps_its_quantizers_and_is_equal(observer):
    """Channel groups + QAT: the compact network keeps each layer's quantizers, its per-channel weight ranges cut with
    the channels, and computes what the fake-quantized model computes; its int8 ONNX file agrees in ONNX Runtime."""
    pytest.importorskip("onnxruntime")
    from lightning_compress import QATConfig, export_onnx, onnx_parity, prepare_qat
    from lightning_compress.quantization.prepare import quantized_layers

    torch.manual_seed(0)
    model = _trained_like(ResNet20((3, 16, 16), 10, width=8))
    x = torch.randn(64, 3, 16, 16)
    prune_channel_groups_(model, x[:4], 0.5)
    prepare_qat(model, QATConfig(observer=observer))
    model.train()
    with torch.no_grad():
        for batch in x.split(16):  # observe ranges
            model(batch)
    model.eval()
    compact = export_compact(model, x[:4], check_inputs=[x])
    assert compact.max_abs_difference <= 1e-4 and compact.quantized_top1_agreement >= 0.995
    layers = quantized_layers(compact)
    assert len(layers) == len(quantized_layers(model))
    for layer in layers.values():
        assert layer.weight_quantizer.scale.numel() == layer.weight.shape[0]
    assert sum(p.numel() for p in compact.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(compact, Path(tmp) / "compact.int8.onnx", x[:4])
        parity = onnx_parity(compact, path, [(x, torch.zeros(64, dtype=torch.long))])
    assert parity["top1_agreement"] == 1.0


def test_factorizing_a_quantization_aware_layer_is_refused():
    from lightning_compress import QATConfig, prepare_qat

    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    prepare_qat(model, QATConfig())
    with pytest.raises(ValueError, match=r"quantization-aware training and `ranks` asks to factorize \['0'\]"):
        export_compact(model, torch.randn(2, 32), ranks={"0": 2})


@pytest.mark.slow
def test_the_app_writes_the_compact_int8_network_when_the_job_quantizes(tmp_path):
    import json

    from test_cli import run_app

    run_dir = tmp_path / "run"
    run_app(
        tmp_path, "recipe=digits_channel50", "+compression@compression.quantization=quantization_aware_training",
        f"hydra.run.dir={run_dir}", "trainer.max_epochs=3", "compression.pruning.end_epoch=1", "logger=none",
        "trainer.enable_progress_bar=false",
    )  # fmt: skip
    report = json.loads((run_dir / "report.json").read_text())
    compact = report["compact"]
    assert compact["onnx_path"] == "model.compact.int8.onnx" and not (run_dir / "model.compact.onnx").exists()
    assert compact["max_abs_difference"] <= 1e-4 and compact["quantized_top1_agreement"] >= 0.995
    assert compact["onnx_parity"]["top1_agreement"] >= 0.995
    assert compact["params"] < 0.3 * report["params"]
    assert (run_dir / "model.compact.int8.onnx").stat().st_size == compact["size_bytes_onnx"]
