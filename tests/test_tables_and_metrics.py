"""Logger-agnostic tables (W&B table or CSV file), the one metric source (torchmetrics) and its clear errors."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import make_trainer, small_module
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_compress import MagnitudePruning
from lightning_compress.core.metrics import agreement, evaluate_accuracy
from lightning_compress.trainer.tables import log_table, table_path


def test_pruning_layer_table_lands_as_a_csv_file_with_the_csv_logger(tmp_path, digits):
    logger = CSVLogger(tmp_path, name="csv")
    pruning = MagnitudePruning(final_sparsity=0.5, end_epoch=1)
    make_trainer(tmp_path, max_epochs=1, logger=logger, callbacks=[pruning]).fit(small_module(), datamodule=digits)
    with open(table_path(logger.log_dir, "compress/layers")) as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == pruning.selected_layers
    measured = pruning.layer_sparsities()
    assert all(float(r["sparsity"]) == pytest.approx(measured[r["layer"]]) for r in rows)


def test_log_table_without_a_log_dir_uses_the_fallback(tmp_path):
    class Plain(CSVLogger):
        @property
        def log_dir(self):
            return None

    (path,) = log_table([Plain(tmp_path)], "a/b", ["x", "y"], [[1, 2]], tmp_path / "fallback")
    assert path == tmp_path / "fallback" / "tables" / "a__b.csv" and path.read_text().splitlines() == ["x,y", "1,2"]


def test_accuracy_comes_from_torchmetrics_and_an_empty_loader_is_an_error():
    net = nn.Linear(3, 3)
    x, y = torch.randn(50, 3), torch.randint(0, 3, (50,))
    expected = float((net(x).argmax(1) == y).float().mean())
    assert evaluate_accuracy(net, [(x[:20], y[:20]), (x[20:], y[20:])]) == pytest.approx(expected)
    assert net.training  # the mode is restored
    with pytest.raises(ValueError, match="the validation loader yielded no batch"):
        evaluate_accuracy(net, [], "the validation loader")
    with pytest.raises(ValueError, match="yields batches without labels"):
        evaluate_accuracy(net, [x])
    assert float(agreement(net(x), net(x))) == 1.0


def test_onnx_parity_on_an_empty_loader_is_an_error(tmp_path):
    from lightning_compress import QATConfig, export_onnx, onnx_parity, prepare_qat

    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    prepare_qat(net, QATConfig())
    net.train()
    net(torch.randn(8, 4))
    net.eval()
    path = export_onnx(net, tmp_path / "m.onnx", torch.randn(2, 4))
    assert onnx_parity(net, path, [torch.randn(5, 4)])["samples"] == 5
    with pytest.raises(ValueError, match=r"onnx_parity: `batches` yielded no batch"):
        onnx_parity(net, path, [])
