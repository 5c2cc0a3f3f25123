"""QAT without a Trainer: a config object and one verb, on any nn.Module; a prepared model pickles and loads in a
fresh process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import qat_steps
from torch import nn

from lightning_compress import QATConfig, export_onnx, prepare_qat
from lightning_compress.core.checks import ArgumentTypeError
from lightning_compress.quantization import set_phase, unprepare
from lightning_compress.quantization.prepare import is_quantized


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )


def test_prepare_train_and_export_without_a_trainer(tmp_path):
    model = net()
    layers = prepare_qat(model, QATConfig(weight_bits=8))
    assert sorted(layers) == ["0", "4"] and all(is_quantized(m) for m in layers.values())
    assert prepare_qat(model, QATConfig(weight_bits=4)) == layers  # a second call changes nothing
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    qat_steps(model, x, y, steps=3, lr=0.01)
    path = export_onnx(model, tmp_path / "m.onnx", x)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99
    # the float model again, bit for bit the same parameters
    unprepare(model)
    assert not any(is_quantized(m) for m in model.modules()) and isinstance(model[1], nn.BatchNorm2d)
    assert type(model[0]) is nn.Conv2d


def test_set_phase_switches_fake_quantization_off_exactly():
    model = net()
    plain = net()
    prepare_qat(model, QATConfig(fold_bn=False))
    model.train()
    model(torch.randn(8, 1, 8, 8))  # observe
    model.eval()
    x = torch.randn(4, 1, 8, 8)
    set_phase(model, observing=False, quantizing=False)
    plain.eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "_quantizer." not in k})
    assert torch.equal(model(x), plain(x))
    set_phase(model, observing=False, quantizing=True)
    assert not torch.equal(model(x), plain(x))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(weight_bits=1), ValueError, r"`weight_bits` must be an integer from 2 to 8, got 1"),
        (dict(observer="percentile"), ValueError, r"`observer` must be one of \('minmax', 'lsq'\)"),
        (dict(per_channel="no"), ArgumentTypeError, r"`per_channel` must be True or False, got 'no'"),
        (dict(averaging_constant=0), ValueError, r"`averaging_constant` must be in \(0, 1\], got 0"),
        (dict(averaging_constant="x"), ArgumentTypeError, r"`averaging_constant` must be a number in \(0, 1\]"),
        (dict(layer_bits=[8]), ValueError, r"`layer_bits` must be a mapping"),
        (dict(include=5), TypeError, r"`include` must be a regular expression, an @selector or a list"),
    ],
)
def test_bad_config_is_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        prepare_qat(net(), QATConfig(**kwargs))


def test_a_prepared_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    model = net()
    prepare_qat(model, QATConfig(weight_bits=4, layer_bits={"@last": 8}, quantize_outputs=True))
    model.train()
    for _ in range(2):
        model(torch.randn(16, 1, 8, 8))
    model.eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    torch.save({"model": model, "x": x, "expected": expected}, tmp_path / "prepared.pt")
    script = textwrap.dedent(
        f"""
        import torch
        saved = torch.load({str(tmp_path / "prepared.pt")!r}, weights_only=False)
        model = saved["model"]
        with torch.no_grad():
            out = model(saved["x"])
        assert torch.equal(out, saved["expected"]), (out - saved["expected"]).abs().max()
        assert type(model[0]).__name__ == "QATConv2d" and model[4].weight_quantizer.spec.bits == 8
        assert type(model[1]).__name__ == "FoldedBatchNorm2d" and model[1]._qat_conv is model[0]
        print("loaded")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "loaded" in proc.stdout
