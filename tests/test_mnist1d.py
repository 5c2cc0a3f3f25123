"""MNIST-1D, generated offline, and Conv1d (+ BatchNorm1d) through every technique and the int8 export."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer

from lightning_compress import KnowledgeDistillation, MagnitudePruning, QuantizationAwareTraining, export_onnx
from lightning_compress.export.onnx import onnx_parity, pruned_zeros_kept
from lightning_compress.quantization.prepare import find_conv_bn_pairs
from lightning_compress.tasks import CNN1D, MLP, ClassificationModule, MNIST1DDataModule


@pytest.fixture(scope="module")
def mnist1d():
    dm = MNIST1DDataModule(batch_size=128, seed=0)
    dm.setup()
    return dm


def test_the_data_is_the_papers_split_generated_offline(mnist1d):
    assert (len(mnist1d.train_set), len(mnist1d.val_set), len(mnist1d.test_set)) == (3600, 400, 1000)
    x, y = mnist1d.train_set.tensors
    assert x.shape[1:] == MNIST1DDataModule.input_shape == (1, 40) and set(y.tolist()) == set(range(10))
    again = MNIST1DDataModule(seed=0)
    again.setup()
    assert torch.equal(again.train_set.tensors[0], x)  # the same signals every time: no download, no drift
    other = MNIST1DDataModule(seed=1)
    other.setup()
    assert torch.equal(other.test_set.tensors[0], mnist1d.test_set.tensors[0])  # the seed moves only the val split
    assert not torch.equal(other.val_set.tensors[0], mnist1d.val_set.tensors[0])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"`num_samples` must be an integer >= 100, got 10"):
        MNIST1DDataModule(num_samples=10)
    with pytest.raises(ValueError, match=r"`val_fraction` must be in \(0, 1\), got 1.5"):
        MNIST1DDataModule(val_fraction=1.5)


def test_conv1d_is_pruned_quantized_with_batchnorm_folded_and_exported(tmp_path, mnist1d):
    pl.seed_everything(0)
    module = ClassificationModule(CNN1D(), lr=3e-3)
    assert find_conv_bn_pairs(module, ["net.features.0", "net.features.3", "net.features.6"]) == {
        "net.features.0": "net.features.1", "net.features.3": "net.features.4", "net.features.6": "net.features.7"
    }  # fmt: skip
    pruning = MagnitudePruning(final_sparsity=0.5, end_epoch=2)
    qat = QuantizationAwareTraining(calibration_steps=5, freeze_bn_epoch=3, freeze_observers_epoch=3)
    make_trainer(tmp_path, max_epochs=4, callbacks=[pruning, qat]).fit(module, mnist1d)
    assert pruning.sparsity() == pytest.approx(0.5, abs=1e-3) and qat.target_reached
    assert {n for n, layer in qat.layers.items() if layer._qat_bn is not None} == {
        "net.features.0", "net.features.3", "net.features.6"
    }  # fmt: skip
    path = export_onnx(module, tmp_path / "cnn1d.onnx", mnist1d.test_set.tensors[0][:64])
    parity = onnx_parity(module, path, mnist1d.test_dataloader())
    assert parity["top1_agreement"] >= 0.995 and parity["accuracy_onnx"] > 0.3
    assert pruned_zeros_kept(path, pruning.masks) == 1.0


def test_a_cnn1d_teacher_distils_into_an_mlp(tmp_path, mnist1d):
    pl.seed_everything(0)
    teacher = ClassificationModule(CNN1D(), lr=3e-3)
    make_trainer(tmp_path / "t", max_epochs=2).fit(teacher, mnist1d)
    kd = KnowledgeDistillation(teacher.net, alpha=0.9)
    trainer = make_trainer(tmp_path / "s", max_epochs=2, callbacks=[kd])
    trainer.fit(ClassificationModule(MLP((1, 40), 10, hidden=[32]), lr=1e-2), mnist1d)
    assert torch.isfinite(trainer.callback_metrics["kd/loss_kd_epoch"])
