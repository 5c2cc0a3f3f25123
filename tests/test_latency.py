"""Speed in every report: the float ONNX export checked before it is written, ONNX Runtime latency, and the
latency objective of sweeps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.analysis.latency import onnx_latency
from lightning_compress.apps.sweeps import check_objective, objective_values
from lightning_compress.export.onnx import ExportMismatchError, export_float_onnx
from lightning_compress.tasks import SmallCNN


def test_float_export_and_latency_of_a_model(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN((1, 8, 8), 10, width=8)
    path = export_float_onnx(model, tmp_path / "model.onnx", torch.randn(4, 1, 8, 8))
    measured = onnx_latency(path, torch.randn(4, 1, 8, 8), threads=1, throughput_batch=32, rounds=2, min_seconds=0.01)
    assert measured["latency_ms_batch1"] > 0 and measured["throughput_per_s"] > 0
    low, high = measured["latency_ms_batch1_range"]
    assert low <= measured["latency_ms_batch1"] <= high
    assert measured["latency_threads"] == 1 and measured["throughput_batch"] == 32


class Noisy(nn.Module):
    """ONNX Runtime draws other random numbers than PyTorch: the file cannot compute what the model computes."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x) + torch.rand_like(self.linear(x))


def test_a_float_export_that_differs_is_refused_and_nothing_written(tmp_path):
    with pytest.raises(ExportMismatchError, match="differ from the model's by up to"):
        export_float_onnx(Noisy(), tmp_path / "noisy.onnx", torch.randn(8, 4))
    assert not (tmp_path / "noisy.onnx").exists()


def test_latency_settings_out_of_range_are_named(tmp_path):
    path = export_float_onnx(SmallCNN((1, 8, 8), 10, width=4), tmp_path / "m.onnx", torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="threads"):
        onnx_latency(path, torch.randn(2, 1, 8, 8), threads=0)


def test_the_latency_objective_reads_validation_accuracy_and_latency():
    report = {"accuracy": 1.0, "val_accuracy": 0.8, "size_bytes_compressed": 10, "latency_ms_batch1": 0.25}
    assert objective_values(report, "accuracy_and_latency") == [0.8, 0.25]
    with pytest.raises(ValueError, match="latency=null turns the measurement off"):
        check_objective("accuracy_and_latency", None)
    with pytest.raises(ValueError, match="`objective` must be one of"):
        check_objective("speed")
