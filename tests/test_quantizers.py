"""Fake quantization numerics against a plain quantize → dequantize reference, at atol=0."""

import math

import pytest
import torch

from lightning_compress.core.quantizers import (
    FakeQuantizer,
    QuantSpec,
    check_bits,
    fake_quantize,
    qparams_from_range,
    quantize,
)


def reference(x, scale, zero_point, spec):
    shape = [1] * x.dim()
    if spec.per_channel:
        shape[spec.axis] = -1
    s, z = scale.reshape(shape), zero_point.reshape(shape).float()
    q = torch.clamp(torch.round(x / s) + z, spec.qmin, spec.qmax)
    return (q - z) * s


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_fake_quantize_equals_quantize_dequantize(bits, symmetric, per_channel):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 5, 3, generator=g) * 2 + (0 if symmetric else 1)
    spec = QuantSpec(bits, symmetric, per_channel, axis=0)
    if per_channel:
        flat = x.reshape(6, -1)
        scale, zp = qparams_from_range(flat.min(1).values, flat.max(1).values, spec)
    else:
        scale, zp = qparams_from_range(x.min().reshape(1), x.max().reshape(1), spec)
    out = fake_quantize(x, scale, zp, spec)
    torch.testing.assert_close(out, reference(x, scale, zp, spec), rtol=0, atol=0)
    ints = quantize(x, scale, zp, spec)
    assert ints.min() >= spec.qmin and ints.max() <= spec.qmax
    for channel in out if per_channel else [out]:
        assert len(torch.unique(channel)) <= 2**bits


def test_grids():
    assert (QuantSpec(8, True).qmin, QuantSpec(8, True).qmax) == (-127, 127)
    assert (QuantSpec(8, False).qmin, QuantSpec(8, False).qmax) == (0, 255)
    assert (QuantSpec(4, True).qmin, QuantSpec(4, True).qmax) == (-7, 7)
    assert (QuantSpec(2, True).qmin, QuantSpec(2, True).qmax) == (-1, 1)


def test_straight_through_gradient_inside_the_grid_only():
    spec = QuantSpec(8, True)
    scale, zp = torch.tensor([0.01]), torch.tensor([0], dtype=torch.int32)
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.27, 5.0], requires_grad=True)
    fake_quantize(x, scale, zp, spec).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_zeros_stay_exactly_zero():
    w = torch.randn(8, 16)
    w[w.abs() < 0.5] = 0.0
    for spec in (QuantSpec(8, True, True), QuantSpec(4, True, True), QuantSpec(8, False, True)):
        scale, zp = qparams_from_range(w.min(1).values, w.max(1).values, spec)
        assert torch.equal(fake_quantize(w, scale, zp, spec)[w == 0], torch.zeros(int((w == 0).sum())))


def test_qparams():
    spec = QuantSpec(8, True)
    scale, zp = qparams_from_range(torch.tensor([-0.5]), torch.tensor([2.54]), spec)
    assert scale.item() == pytest.approx(2.54 / 127) and zp.item() == 0
    spec = QuantSpec(8, False)
    scale, zp = qparams_from_range(torch.tensor([-1.0]), torch.tensor([3.0]), spec)
    assert scale.item() == pytest.approx(4 / 255) and zp.item() == round(1.0 / (4 / 255))
    # all-positive ranges are widened to include zero; degenerate ranges get a tiny finite scale
    scale, zp = qparams_from_range(torch.tensor([2.0]), torch.tensor([3.0]), spec)
    assert zp.item() == 0 and scale.item() == pytest.approx(3 / 255)
    scale, _ = qparams_from_range(torch.tensor([0.0]), torch.tensor([0.0]), spec)
    assert math.isfinite(scale.item()) and scale.item() > 0


def test_activation_observer_moves_only_in_training():
    q = FakeQuantizer(QuantSpec(8, False), averaging_constant=0.5)
    q.train()
    q(torch.tensor([0.0, 2.0]))
    q(torch.tensor([0.0, 4.0]))
    assert q.max_val.item() == pytest.approx(3.0)  # 2 + 0.5 * (4 - 2)
    q.eval()
    q(torch.tensor([0.0, 100.0]))
    assert q.max_val.item() == pytest.approx(3.0)
    q.train()
    q.observing = False
    q(torch.tensor([0.0, 100.0]))
    assert q.max_val.item() == pytest.approx(3.0)


def test_weight_observer_follows_current_weight_also_in_eval():
    q = FakeQuantizer(QuantSpec(8, True, True), channels=2, weight=True).eval()
    q(torch.tensor([[1.0, -2.0], [0.5, 0.25]]))
    q(torch.tensor([[1.0, -4.0], [0.5, 0.25]]))
    assert q.min_val.tolist() == [-4.0, 0.25] and q.max_val.tolist() == [1.0, 0.5]


def test_not_quantizing_is_identity_and_unobserved_passes_through():
    q = FakeQuantizer(QuantSpec(2, True))
    x = torch.randn(10)
    assert torch.equal(q.eval()(x), x)  # nothing observed yet
    q.train()(x)
    q.quantizing = False
    assert torch.equal(q(x), x)


def test_lsq_scale_is_learned():
    q = FakeQuantizer(QuantSpec(4, True, True), observer="lsq", channels=3, weight=True)
    w = torch.randn(3, 20, requires_grad=True)
    out = q(w)
    initial = q.scale.detach().clone()
    torch.testing.assert_close(out, reference(w.detach(), initial, torch.zeros(3, dtype=torch.int32), q.spec))
    out.pow(2).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0 and w.grad is not None
    with torch.no_grad():
        q.scale.mul_(2)
    q(w)
    assert torch.allclose(q.scale, 2 * initial)  # later observations do not overwrite a learned scale


@pytest.mark.parametrize("bits", [1, 9, 4.5, "8", True, None])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=rf"`weight_bits` must be an integer from 2 to 8, got {bits!r}"):
        check_bits("weight_bits", bits)


def test_binary_quantizer_is_the_sign_with_hardtanh_gradient():
    q = FakeQuantizer(QuantSpec(1, symmetric=False), fixed_range=(-1.0, 1.0)).train()
    x = torch.tensor([-2.0, -0.3, 0.0, 0.4, 1.5], requires_grad=True)
    out = q(x)
    assert out.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert q.min_val.item() == -1.0 and q.max_val.item() == 1.0  # nothing is observed


def test_two_bit_fixed_range_for_sigmoid_outputs():
    q = FakeQuantizer(QuantSpec(2, symmetric=False), fixed_range=(0.0, 1.0)).train()
    x = torch.linspace(-0.5, 1.5, 41)
    out = q(x)
    assert sorted(set(out.tolist())) == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert q.max_val.item() == 1.0


def test_binary_needs_a_range():
    with pytest.raises(ValueError, match="a 1-bit .binary. quantizer needs a `fixed_range`"):
        FakeQuantizer(QuantSpec(1, symmetric=False))
