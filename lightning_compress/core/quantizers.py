"""Fake quantization on torch's core ops: integer grids, range observers, learned step sizes.

Nothing here uses ``torch.ao.quantization``'s eager/FX API (deprecated, slated for removal). Fake quantization is
composed of torch's elementwise ops with a straight-through gradient (:func:`fake_quantize`); learned step sizes
(LSQ, Esser et al. 2020) use torch's ``_fake_quantize_learnable_per_tensor_affine`` / ``..._per_channel_affine``.

Conventions, chosen so that the export is standard ONNX QDQ that ONNX Runtime runs as int8:

* weights are **signed and symmetric** on the restricted grid ``[−(2^(b−1) − 1), 2^(b−1) − 1]`` with zero-point 0,
  so a zero weight stays exactly zero (pruned weights survive quantization), per output channel by default;
* activations are **unsigned affine** on ``[0, 2^b − 1]`` (uint8 for 8 bits) by default, or signed symmetric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.checks import Observer, check_choice, check_number


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: bit-width, signedness/symmetry and granularity."""

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    axis: int = 0

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def check_bits(name: str, bits: object, low: int = 2, high: int = 8) -> int:
    """A bit-width that is an integer in [low, high], or a clear error naming the argument."""
    return int(check_number(name, bits, low, high, integer=True, what=f"an integer from {low} to {high}"))


def qparams_from_range(min_val: Tensor, max_val: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero-point (int32) that map [min_val, max_val] onto the spec's integer grid.

    The range is widened to include 0 so that zero is exactly representable. A degenerate range (all equal)
    gets the smallest positive scale rather than 0 or NaN — except an all-zero symmetric range (a weight channel
    pruned whole), which gets scale 1: its values are 0 on any grid, and a layer's int32 bias is on the grid
    input scale × weight scale, where the smallest scale would push a folded BatchNorm's bias past the int32 range
    (clamped: the channel would lose its bias).
    """
    min_val = torch.minimum(min_val.float(), torch.zeros_like(min_val, dtype=torch.float32))
    max_val = torch.maximum(max_val.float(), torch.zeros_like(max_val, dtype=torch.float32))
    eps = torch.finfo(torch.float32).eps
    if spec.symmetric:
        scale = torch.maximum(-min_val, max_val) / spec.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (max_val - min_val) / (spec.qmax - spec.qmin)
        scale = torch.clamp(scale, min=eps)
        zero_point = torch.clamp(spec.qmin - torch.round(min_val / scale), spec.qmin, spec.qmax).to(torch.int32)
    return torch.clamp(scale, min=eps), zero_point


class _FakeQuantizeSTE(torch.autograd.Function):
    """``(clamp(round(x / s) + z, qmin, qmax) − z) · s`` with the straight-through gradient (1 inside the grid,
    0 where clamped). Composed of vectorised elementwise ops: on CPU several times faster than
    ``torch.fake_quantize_per_tensor_affine``, whose kernel dominated a QAT step in profiles."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
        with torch.no_grad():
            q = torch.div(x, scale).round_().add_(zero_point)
            inside = (q >= qmin) & (q <= qmax)
            out = q.clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
        ctx.save_for_backward(inside)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize then dequantize ``x`` (straight-through gradient inside the grid, zero outside)."""
    shape = [1] * x.dim()
    if spec.per_channel:
        shape[spec.axis] = -1
    s = scale.float().reshape(shape)
    z = zero_point.float().reshape(shape)
    return _FakeQuantizeSTE.apply(x, s, z, spec.qmin, spec.qmax)


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """The integers of ``x`` on the spec's grid (as int32): what an exporter stores."""
    shape = [1] * x.dim()
    if spec.per_channel:
        shape[spec.axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return torch.clamp(torch.round(x / scale) + zero_point, spec.qmin, spec.qmax).to(torch.int32)


class _BinarizeSTE(torch.autograd.Function):
    """``hi`` where ``x ≥ (lo + hi)/2`` else ``lo`` (sign for [−1, 1], a 0.5 threshold for [0, 1]); the gradient passes
    straight through inside [lo, hi] and is 0 outside (the hard-tanh estimator of binarised networks)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lo: float, hi: float) -> Tensor:
        ctx.save_for_backward((x >= lo) & (x <= hi))
        return torch.where(x >= (lo + hi) / 2, torch.full_like(x, hi), torch.full_like(x, lo))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


class FakeQuantizer(nn.Module):
    """Observes a tensor's range and fake-quantizes it.

    * ``observer="minmax"``: weights use the current min/max (per channel); activations a moving average of the
      batch min/max (``averaging_constant``). Observation happens only while ``observing`` is on and the module is
      in training mode, so validation, test and predict never move the ranges.
    * ``observer="lsq"``: the scale is a learned parameter (initialised from the observed range, then trained with
      the LSQ gradient scale 1/sqrt(numel·qmax)); the zero-point stays fixed.

    Two switches, both set by the callback: ``observing`` (ranges follow the data) and ``quantizing`` (the
    output is fake-quantized; off, the quantizer is the identity — e.g. during observer calibration). A third,
    ``calibrating``, set by post-training quantization (:func:`~lightning_compress.quantize_`), makes an activation's
    range the running minimum and maximum over all batches instead of a moving average.
    ``weight=True`` marks a weight quantizer: its min/max range is the current weight's, recomputed on every forward
    while observing (in evaluation too: it is a function of the weights, not of the data).

    ``fixed_range=(lo, hi)`` is for bounded activations (the outputs of tanh or sigmoid): the grid spans that range
    and nothing is observed. With ``spec.bits == 1`` it is the binary quantizer: ``hi`` above the midpoint of the
    range, ``lo`` below (the sign for ``(-1, 1)``).
    """

    min_val: Tensor
    max_val: Tensor
    zero_point: Tensor
    scale: Tensor

    def __init__(
        self,
        spec: QuantSpec,
        observer: str = "minmax",
        channels: int = 1,
        averaging_constant: float = 0.01,
        weight: bool = False,
        fixed_range: tuple[float, float] | None = None,
    ):
        super().__init__()
        observer = check_choice("observer", observer, Observer).value
        if spec.bits == 1 and fixed_range is None:
            raise ValueError("a 1-bit (binary) quantizer needs a `fixed_range`.")
        self.spec, self.observer, self.averaging_constant = spec, observer, averaging_constant
        n = channels if spec.per_channel else 1
        self.register_buffer("min_val", torch.full((n,), math.inf))
        self.register_buffer("max_val", torch.full((n,), -math.inf))
        self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32))
        if observer == "lsq":
            self.scale = nn.Parameter(torch.ones(n))
        else:
            self.register_buffer("scale", torch.ones(n))
        self.is_weight = weight
        self.quantizing = True
        self.observing = True
        self.calibrating = False  # post-training calibration: the range is the running min/max over all batches
        self.measure_clipping = False  # set by the callback on logging steps
        self.last_clip_fraction: float | None = None
        self.fixed_range = None if fixed_range is None else (float(fixed_range[0]), float(fixed_range[1]))
        # Whether a range is known (min_val finite), kept as a Python flag: reading it from the tensor would stop a
        # torch.compile graph at every quantizer (a data-dependent branch); the flag is guarded once instead.
        self._observed = self.fixed_range is not None
        if self.fixed_range is not None:
            self.min_val.fill_(self.fixed_range[0])
            self.max_val.fill_(self.fixed_range[1])
            if spec.bits > 1:
                self.refresh_qparams()

    @property
    def binary(self) -> bool:
        return self.spec.bits == 1

    @property
    def initialized(self) -> bool:
        """Whether a range has been observed (or loaded, or fixed)."""
        return self._observed

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._observed = bool(torch.isfinite(self.min_val).all())

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        spec = self.spec
        if spec.per_channel:
            flat = x.detach().transpose(0, spec.axis).reshape(x.shape[spec.axis], -1)
            lo, hi = torch.aminmax(flat, dim=1)
        else:
            lo, hi = torch.aminmax(x.detach())
            lo, hi = lo.reshape(1), hi.reshape(1)
        lo, hi = lo.float(), hi.float()
        moving = not self.is_weight and self.initialized  # activations: moving average; weights: current range
        if moving and self.calibrating:
            lo, hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        elif moving:
            c = self.averaging_constant
            lo, hi = self.min_val + c * (lo - self.min_val), self.max_val + c * (hi - self.max_val)
        first = not self.initialized
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self._observed = True
        if self.observer == "minmax" or first:  # a learned scale (and its zero-point) is only initialised here
            self.refresh_qparams()

    @torch.no_grad()
    def reset_range(self) -> None:
        """Forget the observed range of an activation quantizer (a fixed range and a weight's range stay)."""
        if self.fixed_range is None and not self.is_weight:
            self.min_val.fill_(math.inf)
            self.max_val.fill_(-math.inf)
            self._observed = False

    @torch.no_grad()
    def refresh_qparams(self) -> None:
        """Scale and zero-point from the observed range (after the range was changed from outside)."""
        scale, zero_point = qparams_from_range(self.min_val, self.max_val, self.spec)
        self.scale.data.copy_(scale)
        self.zero_point.copy_(zero_point)

    def forward(self, x: Tensor) -> Tensor:
        if self.observing and (self.training or self.is_weight) and self.fixed_range is None:
            self.observe(x)
        if not self.quantizing or not self.initialized:
            return x  # nothing observed yet (e.g. a validation pass before the first training step)
        if self.measure_clipping and not self.spec.per_channel:
            with torch.no_grad():
                lo, hi = self.grid_range()
                self.last_clip_fraction = float(((x < lo) | (x > hi)).float().mean())
        if self.binary:
            assert self.fixed_range is not None
            return _BinarizeSTE.apply(x, *self.fixed_range)
        if self.observer == "lsq":
            grad_factor = 1.0 / math.sqrt(x.numel() / self.scale.numel() * self.spec.qmax)
            scale = self.scale.abs() + torch.finfo(torch.float32).eps
            zp = self.zero_point.float()
            if self.spec.per_channel:
                return torch._fake_quantize_learnable_per_channel_affine(
                    x, scale, zp, self.spec.axis, self.spec.qmin, self.spec.qmax, grad_factor
                )
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, scale, zp, self.spec.qmin, self.spec.qmax, grad_factor
            )
        return fake_quantize(x, self.scale, self.zero_point, self.spec)

    def grid_range(self) -> tuple[Tensor, Tensor]:
        """The smallest and largest value the quantizer outputs (per channel for per-channel quantizers)."""
        if self.binary:
            assert self.fixed_range is not None
            return torch.tensor(self.fixed_range[0]), torch.tensor(self.fixed_range[1])
        scale, zp = self.qparams()
        return (self.spec.qmin - zp) * scale, (self.spec.qmax - zp) * scale

    def qparams(self) -> tuple[Tensor, Tensor]:
        """The scale and zero-point in use (for LSQ, the learned scale's magnitude)."""
        scale = self.scale.detach().abs() + (torch.finfo(torch.float32).eps if self.observer == "lsq" else 0.0)
        return scale.float(), self.zero_point

    def extra_repr(self) -> str:
        s = self.spec
        kind = "per-channel" if s.per_channel else "per-tensor"
        if self.fixed_range is not None:
            return f"bits={s.bits}, {'binary' if self.binary else 'affine'}, fixed range {self.fixed_range}"
        return f"bits={s.bits}, {'symmetric' if s.symmetric else 'affine'}, {kind}, observer={self.observer}"


class MirroredQuantizer(nn.Module):
    """The grid of another quantizer, for a tensor whose values are already on it: a max pooling of a quantized tensor
    (the maximum of values on a grid is on that grid). The identity in the model, with no state of its own; the
    export quantizes the tensor with the source's scale and zero-point, which lets ONNX Runtime run the pooling on the
    integers (a pooling between two different grids would run in float between a DequantizeLinear and a
    QuantizeLinear)."""

    source: Any

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "source", source)  # a reference, not a child: the source is registered where it is
        self.observing = self.quantizing = self.calibrating = self.measure_clipping = False
        self.binary = self.is_weight = False  # read by a layer that takes it as its input quantizer
        self.fixed_range: tuple[float, float] | None = None
        self.last_clip_fraction: float | None = None

    @property
    def spec(self) -> QuantSpec:
        spec: QuantSpec = self.source.spec
        return spec

    @property
    def initialized(self) -> bool:
        return bool(self.source.initialized)

    def qparams(self) -> tuple[Tensor, Tensor]:
        scale, zero_point = self.source.qparams()
        return scale, zero_point

    def __getattr__(self, name: str) -> Any:
        if name in ("min_val", "max_val", "scale", "zero_point"):  # the source's range and grid, read-only
            return getattr(self.source, name)
        return super().__getattr__(name)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return "the grid of the quantizer of the tensor it pools"
