"""Post-training quantization (quantize_): ranges calibrated in evaluation mode, BatchNorm untouched, the same int8
export as QAT, and a QAT callback that starts from the calibrated ranges."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_trainer, small_module
from torch import nn

from lightning_compress import QATConfig, QuantizationAwareTraining, export_onnx, onnx_parity, quantize_
from lightning_compress.core.metrics import evaluate_accuracy
from lightning_compress.export.onnx import PARITY_GOAL
from lightning_compress.quantization.prepare import all_quantizers, quantized_layers
from lightning_compress.tasks import DigitsDataModule


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small CNN trained on digits for a few epochs (float), with its data."""
    torch.manual_seed(0)
    dm = DigitsDataModule(seed=0)
    module = small_module(width=16, hidden=64)
    make_trainer(tmp_path_factory.mktemp("float"), max_epochs=6).fit(module, dm)
    dm.setup()
    return module, dm


def calibration(dm, n=4):
    return [batch for _, batch in zip(range(n), dm.train_dataloader(), strict=False)]


def test_ptq_int8_keeps_accuracy_batchnorm_and_exports_with_parity(trained, tmp_path):
    module, dm = trained
    model = copy.deepcopy(module.net)
    float_acc = evaluate_accuracy(model.eval(), dm.test_dataloader(), "test")
    model.train()  # the user's mode is restored afterwards
    bn_stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    layers = quantize_(model, QATConfig(), calibration(dm))
    assert model.training and set(layers) == set(quantized_layers(model))
    # BatchNorm statistics untouched: calibration ran in evaluation mode
    assert all(torch.equal(b, bn_stats[n]) for n, b in model.named_buffers() if n in bn_stats)
    quantizers = all_quantizers(model)
    assert quantizers and all(q.initialized and q.quantizing and not q.observing for q in quantizers)
    model.eval()
    int8_acc = evaluate_accuracy(model, dm.test_dataloader(), "test")
    assert int8_acc >= float_acc - 0.01
    x = next(iter(dm.test_dataloader()))[0]
    path = export_onnx(model, tmp_path / "ptq.onnx", x)
    assert onnx_parity(model, path, dm.test_dataloader())["top1_agreement"] >= PARITY_GOAL


def test_ptq_ranges_are_the_extremes_over_every_batch():
    net = nn.Sequential(nn.Linear(2, 2)).eval()
    batches = [torch.tensor([[1.0, 2.0]]), torch.tensor([[-3.0, 0.5]]), torch.tensor([[0.0, 5.0]])]
    quantize_(net, QATConfig(quantize_outputs=False), batches)
    q = net[0].input_quantizer
    assert (float(q.min_val), float(q.max_val)) == (-3.0, 5.0)  # not a moving average of them


def test_ptq_takes_a_forward_loop_and_refuses_one_that_runs_nothing(trained):
    module, dm = trained
    seen = []

    def loop(model):
        for x, _ in calibration(dm, 2):
            seen.append(x.shape[0])
            model(x)

    quantize_(copy.deepcopy(module.net), {"weight_bits": 4}, loop)
    assert len(seen) == 2
    with pytest.raises(ValueError, match=r"forward_loop ran no batch through the model"):
        quantize_(copy.deepcopy(module.net), QATConfig(), lambda model: None)
    with pytest.raises(ValueError, match=r"forward_loop ran no batch through the model"):
        quantize_(copy.deepcopy(module.net), QATConfig(), [])
    with pytest.raises(ValueError, match=r"quantize_ needs calibration data"):
        quantize_(copy.deepcopy(module.net), QATConfig())
    with pytest.raises(ValueError, match=r"`weight_bits` must be an integer from 2 to 8"):
        quantize_(copy.deepcopy(module.net), QATConfig(weight_bits=9), calibration(dm))


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.spare = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.body(x)


def test_a_layer_no_batch_reaches_is_named_and_the_advice_works():
    batches = [torch.randn(8, 4)]
    with pytest.raises(ValueError, match=r"no calibration batch reached layer\(s\) 'spare'.*exclude=\['spare'\]"):
        quantize_(TwoHeads(), QATConfig(), batches)
    model = TwoHeads()
    assert set(quantize_(model, QATConfig(exclude=["spare"]), batches)) == {"body"}


def test_qat_starts_from_the_calibrated_ranges(trained, tmp_path):
    module, dm = trained
    student = copy.deepcopy(module)
    quantize_(student, QATConfig(), [(x,) for x, _ in calibration(dm)])
    before = {id(q): (q.min_val.clone(), q.max_val.clone()) for q in all_quantizers(student)}
    qat = QuantizationAwareTraining(calibration_steps=0)
    make_trainer(tmp_path, callbacks=[qat], max_epochs=1, limit_train_batches=1).fit(student, dm)
    after = all_quantizers(student)
    assert {id(q) for q in after} == set(before)  # the same quantizers: not prepared again
    for q in after:
        lo, hi = before[id(q)]
        if q.is_weight:
            continue  # a weight's range is its current one
        # one moving-average step (averaging constant 0.01) from the calibrated range, not a new range
        assert torch.allclose(q.min_val, lo, atol=0.05 * float((hi - lo).abs().max()))
        assert torch.allclose(q.max_val, hi, atol=0.05 * float((hi - lo).abs().max()))
