"""The techniques in a Lightning Fabric loop (and a plain PyTorch loop): the same callbacks, driven by
CompressionLoop from the optimizer's step hooks; targets reached, exports work, the model's train/eval mode kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import small_module
from lightning.fabric import Fabric
from torch import nn

from lightning_compress import (
    CompressionLoop,
    LowRankFactorization,
    MagnitudePruning,
    QATConfig,
    QuantizationAwareTraining,
    WeightClustering,
    export_onnx,
    prepare_qat,
)
from lightning_compress.tasks import DigitsDataModule, SmallCNN

X = torch.zeros(2, 1, 8, 8)


def digits_loader():
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup("fit")
    return dm.train_dataloader()


def train(fabric, model, techniques, epochs=4, stop_after=None):
    loader = digits_loader()
    loop = CompressionLoop(model, techniques, steps_per_epoch=len(loader), max_epochs=epochs, train_dataloader=loader)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    if fabric is not None:
        model, optimizer = fabric.setup(model, optimizer)
        loader = fabric.setup_dataloaders(loader)
    loop.start(optimizer, fabric)
    steps = 0
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            fabric.backward(loss) if fabric is not None else loss.backward()
            optimizer.step()
            steps += 1
            if stop_after is not None and steps >= stop_after:
                break
        if stop_after is not None and steps >= stop_after:
            break
    loop.finish()
    return loop


def test_fabric_loop_prunes_then_quantizes_and_exports(tmp_path):
    fabric = Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    module = small_module()  # a LightningModule, driven as it is
    pruning, qat = MagnitudePruning(final_sparsity=0.8, end_epoch=2), QuantizationAwareTraining(calibration_steps=2)
    train(fabric, module, [pruning, qat])
    assert pruning.target_reached and abs(pruning.sparsity() - 0.8) < 1e-3
    assert qat.target_reached and pruning.stopped_short is None
    export_onnx(module, tmp_path / "m.onnx", X)


def test_plain_module_in_a_plain_loop_with_low_rank_and_clustering():
    torch.manual_seed(0)
    net = SmallCNN((1, 8, 8), 10, width=8, hidden=32)  # any nn.Module: hosted for the techniques
    low_rank = LowRankFactorization(ratio=2, end_epoch=1, include="classifier")
    clustering = WeightClustering(clusters=8, include="features")
    train(None, net, [low_rank, clustering], epochs=2)
    assert low_rank.target_reached and low_rank.ratio_reached() >= 2 - 1e-6
    assert clustering.target_reached
    for name, weight in clustering.weights.items():
        assert len(torch.unique(weight[weight != 0])) <= 8, name
    assert set(low_rank.ranks) <= {"model.classifier.1", "model.classifier.3"}  # names as the host sees them


def test_a_loop_that_stops_early_reaches_the_target_at_finish():
    torch.manual_seed(0)
    pruning = MagnitudePruning(final_sparsity=0.9, end_epoch=3)
    with pytest.warns(UserWarning, match=r"MagnitudePruning: training stopped .* before final_sparsity=0.9"):
        train(None, small_module(), [pruning], epochs=4, stop_after=10)
    assert pruning.target_reached and abs(pruning.sparsity() - 0.9) < 1e-3


def test_prepare_qat_keeps_the_models_mode():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    prepare_qat(net, QATConfig())
    assert not any(m.training for m in net.modules())
    with torch.no_grad():
        net(torch.randn(3, 4))  # evaluation records no activation range
    assert not net[0].input_quantizer.initialized
    net.train()
    net(torch.randn(3, 4))
    assert net[0].input_quantizer.initialized
