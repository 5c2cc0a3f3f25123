"""torch.compile: compiled models train with the techniques without recompiling every step, and every export, report
and verb takes a compiled model as the module it wraps.

The tests compile with a counting backend (``torch.compile``'s own tracing and guards, no code generation), so they
check what decides the step time of a compiled run — graphs compiled, graph breaks — in seconds. The step time itself
is measured by ``benchmarks/compile_step_time.py`` with the default (inductor) backend.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from conftest import make_trainer, small_module
from lightning.pytorch.utilities.compile import from_compiled

from lightning_compress import (
    MagnitudePruning,
    QATConfig,
    QuantizationAwareTraining,
    compression_summary,
    export_onnx,
    prepare_qat,
)
from lightning_compress.core.compiled import uncompiled
from lightning_compress.tasks import DigitsDataModule

X = torch.randn(4, 1, 8, 8)


class CountingBackend:
    """A torch.compile backend that runs the traced graphs as they are and counts them."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


class GraphsPerEpoch(pl.Callback):
    def __init__(self, backend: CountingBackend) -> None:
        self.backend, self.counts = backend, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.counts.append(self.backend.graphs)


def test_compiled_network_trains_with_pruning_and_qat_without_recompiling_every_step(tmp_path):
    torch._dynamo.reset()
    backend = CountingBackend()
    module = small_module()
    module.net = torch.compile(module.net, backend=backend)
    pruning, qat = MagnitudePruning(final_sparsity=0.8, end_epoch=1), QuantizationAwareTraining(calibration_steps=2)
    counter = GraphsPerEpoch(backend)
    make_trainer(tmp_path, callbacks=[pruning, qat, counter], max_epochs=4).fit(module, DigitsDataModule())
    assert qat.target_reached and pruning.sparsity() > 0.79
    # Compilations happen when a phase changes (float -> calibrating -> quantizing, the ramp's end) and for the last,
    # smaller batch; once the phases hold, an epoch of 19 steps + validation compiles nothing.
    assert counter.counts[-1] == counter.counts[-2], counter.counts
    # No graph break per quantized layer: the whole network is a few graphs, not one per layer and phase.
    assert counter.counts[-1] <= 16, counter.counts


def test_exports_and_reports_take_a_compiled_model(tmp_path):
    torch._dynamo.reset()
    module = small_module()
    qat = QuantizationAwareTraining(calibration_steps=2)
    make_trainer(tmp_path, callbacks=[qat], max_epochs=1, limit_train_batches=4).fit(module, DigitsDataModule())
    module.eval()
    plain_file = export_onnx(module, tmp_path / "plain.onnx", X).read_bytes()
    wrapped = torch.compile(module, backend="eager")  # torch.compile's wrapper
    assert export_onnx(wrapped, tmp_path / "wrapped.onnx", X).read_bytes() == plain_file
    assert compression_summary(wrapped) == compression_summary(module)
    lightning_compiled = from_compiled(torch.compile(module, backend="eager"))  # what Lightning's fit makes of it
    compiled_forward = lightning_compiled.forward
    assert export_onnx(lightning_compiled, tmp_path / "lightning.onnx", X).read_bytes() == plain_file
    assert lightning_compiled.forward == compiled_forward  # training goes on compiled after the export
    with uncompiled(lightning_compiled) as plain:
        assert plain is module and plain.forward != compiled_forward


def test_a_verb_on_a_compiled_model_prepares_the_module_it_wraps():
    torch._dynamo.reset()
    module = small_module()
    compiled = torch.compile(module, backend="eager")
    layers = prepare_qat(compiled, QATConfig())
    assert set(layers) == {"net.features.0", "net.features.3", "net.features.7", "net.classifier.1", "net.classifier.3"}
    assert all(layer is module.get_submodule(name) for name, layer in layers.items())
    with torch.no_grad():
        compiled(X)  # a training-mode step through the wrapper observes the ranges of the prepared module
        assert module.get_submodule("net.features.0").input_quantizer.initialized
        # Compared in eval mode: every training-mode forward moves BatchNorm's running statistics, which the folded
        # weight's grid follows, so two training-mode forwards differ by design (in 11 of 300 random inputs).
        module.eval()
        assert torch.equal(compiled(X), module(X))  # the wrapper runs the prepared module
