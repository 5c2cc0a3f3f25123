"""Put fake quantizers on Conv/Linear layers and take them off again.

A selected layer keeps its identity, its parameters and its place in the model: its class is swapped for a
subclass whose forward fake-quantizes the input activation and the weight, and two quantizer submodules are
added (``input_quantizer``, ``weight_quantizer``). The model's own ``state_dict`` keys are unchanged; the
quantizers add theirs beside them (scales, zero-points, observed ranges), so a checkpoint carries them.

**Conv + BatchNorm folding.** When a Conv feeds a BatchNorm directly, the weight that is quantized is the folded
one, ``w · γ/√(σ²+ε)`` (running statistics). While the BatchNorm trains with batch statistics, the conv output is
divided back by that factor so that the BatchNorm still normalises it (Jacob et al. 2018; Krishnamoorthi 2018).
Once the BatchNorm is in evaluation mode (in validation and test, and in training once frozen) the conv computes
the folded layer itself — ``conv(x, fq(w_fold)) + fq(b_fold)``, the bias on the int32 grid of the export — and
the BatchNorm passes its input on: PyTorch then computes what the exported integer model computes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.quantization.quantizers import FakeQuantizer, QuantSpec, fake_quantize

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_SWAPPED: dict[tuple[type, type], type] = {}


def bn_factor(bn: Any) -> Tensor:
    """γ/√(σ²+ε) of a BatchNorm's running statistics (the per-channel factor that folds it into a conv)."""
    factor = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        factor = factor * bn.weight
    # A channel with γ = 0 would divide by zero in the training-time un-scaling; keep its sign, bound its size.
    tiny = torch.finfo(factor.dtype).tiny ** 0.5
    return torch.where(factor.abs() < tiny, torch.full_like(factor, tiny), factor)


def folded_weight_and_bias(layer: Any) -> tuple[Tensor, Tensor | None]:
    """The weight and bias a quantized layer computes with, its BatchNorm folded in when it has one."""
    bn = getattr(layer, "_qat_bn", None)
    weight, bias = layer.weight, layer.bias
    if bn is None:
        return weight, bias
    factor = bn_factor(bn)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    bias0 = bias if bias is not None else torch.zeros_like(bn.running_mean)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    return weight * factor.reshape(shape), beta + (bias0 - bn.running_mean) * factor


class _QATMixin:
    """Forward of a fake-quantized Conv/Linear (mixed into a subclass of the layer's own class)."""

    input_quantizer: FakeQuantizer
    weight_quantizer: FakeQuantizer
    _qat_bn: nn.Module | None

    def _quantized_bias(self, bias: Tensor) -> Tensor:
        w_scale, _ = self.weight_quantizer.qparams()
        a_scale, _ = self.input_quantizer.qparams()
        if not self.input_quantizer.initialized or self.input_quantizer.binary:
            return bias  # a binary input is not on an integer grid: the export keeps this bias in float
        grid = (a_scale.reshape(-1)[0] * w_scale).expand_as(bias)
        spec = QuantSpec(32, symmetric=True, per_channel=True, axis=0)  # int32 accumulator grid, never clamped
        return fake_quantize(bias, grid, torch.zeros_like(grid, dtype=torch.int32), spec)

    def _compute(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if isinstance(self, nn.Linear):
            return F.linear(x, weight, bias)
        return self._conv_forward(x, weight, bias)  # type: ignore[attr-defined]

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quantizer(x)
        weight: Tensor = self.weight  # type: ignore[attr-defined]
        bias: Tensor | None = self.bias  # type: ignore[attr-defined]
        bn = self._qat_bn
        if not self.weight_quantizer.quantizing:
            # Float phases (before start_epoch, observer calibration): exactly the plain layer's computation;
            # the weight's range is still observed, BatchNorm folded in, so quantization starts calibrated.
            if self.weight_quantizer.observing:
                self.weight_quantizer(weight if bn is None else folded_weight_and_bias(self)[0].detach())
            return self._compute(x, weight, bias)
        if bn is None or not bn.training:
            # Exactly the integer model's computation: folded weight on its grid, bias on the int32 grid
            # input_scale x weight_scale. A folded BatchNorm (frozen, or in evaluation) then passes its input on.
            if bn is not None:
                weight, bias = folded_weight_and_bias(self)
            w_q = self.weight_quantizer(weight)
            y = self._compute(x, w_q, None if bias is None else self._quantized_bias(bias))
            output_quantizer = getattr(self, "output_quantizer", None)
            return y if output_quantizer is None else output_quantizer(y)
        # Training with batch statistics. The folding factor is treated as a constant: through the fold,
        # conv(x, w·f)/f depends on γ only via quantization error, and γ gets its gradient from the BatchNorm
        # itself (differentiating it would cost a reduction over the whole output per layer).
        factor = bn_factor(bn).detach()
        shape = (-1,) + (1,) * (weight.dim() - 1)
        y = self._compute(x, self.weight_quantizer(weight * factor.reshape(shape)), None)
        out_shape = (1, -1) + (1,) * (y.dim() - 2)
        y = y * factor.reciprocal().reshape(out_shape)
        return y if bias is None else y + bias.reshape(out_shape)


class _FoldedBatchNormMixin:
    """A BatchNorm folded into the quantized conv before it: while the conv computes the folded integer model
    (BatchNorm not training, conv quantizing) the BatchNorm passes its input on unchanged."""

    _qat_conv: Any

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and self._qat_conv.weight_quantizer.quantizing:  # type: ignore[attr-defined]
            return x
        return super().forward(x)  # type: ignore[misc]


def _swapped_class(cls: type, mixin: type, prefix: str) -> type:
    key = (cls, mixin)
    if key not in _SWAPPED:
        # Named in this module's namespace so that pickling a quantized model (torch.save) finds the class.
        name = (
            f"{prefix}{cls.__name__}"
            if cls.__module__.startswith("torch.")
            else f"{prefix}_{cls.__module__}_{cls.__qualname__}"
        )
        name = "".join(c if c.isalnum() else "_" for c in name)
        new = type(name, (mixin, cls), {"_original_class": cls, "__module__": __name__, "__qualname__": name})
        globals()[name] = _SWAPPED[key] = new
    return _SWAPPED[key]


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, _QATMixin)


def attach(
    layer: nn.Module,
    weight_quantizer: FakeQuantizer,
    input_quantizer: FakeQuantizer,
    bn: nn.Module | None = None,
    output_quantizer: FakeQuantizer | None = None,
) -> None:
    """Make ``layer`` fake-quantize its input and weight (folding ``bn`` when given) and, with
    ``output_quantizer``, its output once it computes the folded layer. Idempotent."""
    if is_quantized(layer):
        return
    layer.__class__ = _swapped_class(type(layer), _QATMixin, "QAT")
    layer.add_module("weight_quantizer", weight_quantizer)
    layer.add_module("input_quantizer", input_quantizer)
    if output_quantizer is not None:
        layer.add_module("output_quantizer", output_quantizer)
    object.__setattr__(layer, "_qat_bn", bn)  # a reference, not a child: the BatchNorm stays where it is
    if bn is not None:
        bn.__class__ = _swapped_class(type(bn), _FoldedBatchNormMixin, "Folded")
        object.__setattr__(bn, "_qat_conv", layer)


def detach(layer: nn.Module) -> None:
    """Undo :func:`attach`: the layer is a plain Conv/Linear again (quantizers and their state removed)."""
    if not is_quantized(layer):
        return
    bn = layer._qat_bn
    if bn is not None:
        bn.__class__ = bn._original_class  # type: ignore[assignment,union-attr]
        object.__delattr__(bn, "_qat_conv")
    layer.__class__ = layer._original_class  # type: ignore[attr-defined,assignment]
    del layer.weight_quantizer, layer.input_quantizer
    if hasattr(layer, "output_quantizer"):
        del layer.output_quantizer
    object.__delattr__(layer, "_qat_bn")


def find_conv_bn_pairs(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Conv name → name of the BatchNorm that directly consumes its output.

    The model is traced with ``torch.fx`` when it can be; otherwise Conv→BatchNorm neighbours inside an
    ``nn.Sequential`` are paired. A Conv whose output is also used elsewhere is not paired (folding would change
    what the other consumer sees).
    """
    modules = dict(model.named_modules())
    wanted = {n for n in names if isinstance(modules[n], (nn.Conv1d, nn.Conv2d, nn.Conv3d))}
    try:
        return _pairs_by_tracing(model, modules, wanted)
    except Exception:  # noqa: BLE001 - any tracing failure falls back to the structural rule below
        return _pairs_in_sequentials(modules, wanted)


def _pairs_by_tracing(model: nn.Module, modules: dict[str, nn.Module], wanted: set[str]) -> dict[str, str]:
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, *_BN_TYPES)) or super().is_leaf_module(m, qualname)

    graph = _Tracer().trace(model)
    pairs = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in wanted and len(node.users) == 1:
            (user,) = node.users
            if user.op == "call_module" and isinstance(modules.get(user.target), _BN_TYPES):
                pairs[node.target] = user.target
    return pairs


def _pairs_in_sequentials(modules: dict[str, nn.Module], wanted: set[str]) -> dict[str, str]:
    pairs = {}
    for name, module in modules.items():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (a, _), (b, mb) in zip(children, children[1:], strict=False):
                full = f"{name}.{a}" if name else a
                if full in wanted and isinstance(mb, _BN_TYPES):
                    pairs[full] = f"{name}.{b}" if name else b
    return pairs


def quantized_layers(model: nn.Module) -> dict[str, Any]:
    """Name → layer for every fake-quantized layer of ``model``."""
    return {n: m for n, m in model.named_modules() if is_quantized(m)}
