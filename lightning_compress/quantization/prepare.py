"""Quantization-aware training without a Trainer: a config object and one verb, :func:`prepare_qat`.

    layers = prepare_qat(model, QATConfig(weight_bits=8))   # any nn.Module: fake quantizers on its Conv/Linear
    ...train as usual...                                     # ranges observed in training mode, then quantized
    export_onnx(model, "model.int8.onnx", example_input)     # the convert step: int8 QDQ ONNX, verified

:func:`set_phase` switches observation and fake quantization on or off (the callback drives it along the schedule);
:func:`unprepare` takes the quantizers off again; :func:`float_state_dict` turns a QAT checkpoint's state dict into one
that loads strictly into the unmodified model class.

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

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.core.checks import Observer, check_choice, check_flag, check_number
from lightning_compress.core.quantizers import FakeQuantizer, QuantSpec, check_bits, fake_quantize
from lightning_compress.core.selection import (
    check_overrides_match,
    inside,
    match_overrides,
    not_compressed,
    select_modules,
)

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


def _rebuild(original: type, mixin_name: str) -> Any:
    """Unpickling a prepared layer: the swapped class is made again from the layer's own class."""
    mixin, prefix = _MIXINS[mixin_name]
    cls: Any = _swapped_class(original, mixin, prefix)
    return cls.__new__(cls)


class _Swapped:
    """Pickles a layer whose class was swapped at run time by naming its own class and the mixin, so that a prepared
    model saved with ``torch.save(model)`` loads in a fresh process (where the swapped class does not exist yet)."""

    _original_class: type

    def __reduce_ex__(self, protocol: Any) -> Any:
        reduced = super().__reduce_ex__(protocol)  # (constructor, args, state, ...)
        mixin = next(name for name, (m, _) in _MIXINS.items() if isinstance(self, m))
        return (_rebuild, (self._original_class, mixin), *reduced[2:])


class _QATMixin(_Swapped):
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


class _FoldedBatchNormMixin(_Swapped):
    """A BatchNorm folded into the quantized conv before it: while the conv computes the folded integer model
    (BatchNorm not training, conv quantizing) the BatchNorm passes its input on unchanged."""

    _qat_conv: Any

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and self._qat_conv.weight_quantizer.quantizing:  # type: ignore[attr-defined]
            return x
        return super().forward(x)  # type: ignore[misc]


_MIXINS: dict[str, tuple[type, str]] = {"qat": (_QATMixin, "QAT"), "folded_bn": (_FoldedBatchNormMixin, "Folded")}


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
    """Whether ``module`` is a layer that :func:`prepare_qat` fake-quantizes."""
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


def _check_range(name: str, value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a pair (low, high), e.g. (-1, 1) after tanh; got {value!r}.") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"`{name}` must be finite with low < high, got {value!r}.")
    return lo, hi


def _check_activation_bits(name: str, bits: Any, fixed_range: tuple[float, float] | None) -> int:
    if bits == 1 and not isinstance(bits, bool) and fixed_range is None:
        raise ValueError(
            f"`{name}`=1 is the binary quantizer for bounded activations and needs `activation_range` "
            "(e.g. (-1, 1) after tanh, (0, 1) after sigmoid); otherwise use 2 to 8 bits."
        )
    return check_bits(name, bits, low=1 if fixed_range is not None else 2)


@dataclass
class QATConfig:
    """How :func:`prepare_qat` quantizes a model's Conv and Linear layers (checked when built).

    Args:
        weight_bits: Bits of the weights, 2–8.
        activation_bits: Bits of the input activations, 2–8 (1: binary, with ``activation_range``).
        per_channel: Weight scales per output channel (``True``) or per tensor.
        weight_symmetric: Symmetric weights with zero-point 0 (``True``) or affine.
        activation_symmetric: Signed symmetric activations, or unsigned affine (``False``, the default).
        observer: ``"minmax"`` or ``"lsq"`` (learned step sizes).
        fold_bn: Fold a Conv's BatchNorm into its quantized weight.
        layer_bits: ``{pattern: bits}`` (weight bits) or ``{pattern: {"weight_bits": b, "activation_bits": b,
            "activation_range": (lo, hi)}}`` per-layer overrides; patterns are regular expressions or selectors such as
            ``"@first"`` / ``"@last"`` (see :mod:`lightning_compress.core.selection`).
        include: Regular expression(s) or selectors of the layers to quantize.
        exclude: Regular expression(s) or selectors of layers to leave in float.
        averaging_constant: Weight of a new batch in the activation observers' moving average, in (0, 1].
        activation_range: ``(low, high)`` of bounded input activations (tanh: ``(-1, 1)``, sigmoid: ``(0, 1)``).
        quantize_outputs: Also quantize each layer's output once it computes the folded integer model (the default:
            ONNX Runtime then runs every layer with integer kernels; without it the int8 file ran slower than fp32).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
        >>> sorted(prepare_qat(net, QATConfig(weight_bits=4, layer_bits={"@last": 8})))
        ['0', '4']
        >>> net[4].weight_quantizer.spec.bits, net[0].weight_quantizer.spec.bits
        (8, 4)
    """

    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    weight_symmetric: bool = True
    activation_symmetric: bool = False
    observer: str = "minmax"
    fold_bn: bool = True
    layer_bits: Mapping[str, Any] | None = None
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    averaging_constant: float = 0.01
    activation_range: Sequence[float] | None = None
    quantize_outputs: bool = True
    overrides: dict[str, dict[str, Any]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.weight_bits = check_bits("weight_bits", self.weight_bits)
        self.activation_range = _check_range("activation_range", self.activation_range)
        self.activation_bits = _check_activation_bits("activation_bits", self.activation_bits, self.activation_range)
        self.observer = check_choice("observer", self.observer, Observer).value
        for name in ("per_channel", "weight_symmetric", "activation_symmetric", "fold_bn", "quantize_outputs"):
            check_flag(name, getattr(self, name))
        self.averaging_constant = float(check_number("averaging_constant", self.averaging_constant, 0, 1,
                                                     low_open=True))  # fmt: skip
        if self.layer_bits is not None and not isinstance(self.layer_bits, Mapping):
            raise ValueError(f"`layer_bits` must be a mapping {{layer pattern: bits}}, got {self.layer_bits!r}.")
        self.overrides = {str(p): self._parse_override(str(p), v) for p, v in dict(self.layer_bits or {}).items()}

    def _parse_override(self, pattern: str, value: Any) -> dict[str, Any]:
        where = f"layer_bits[{pattern!r}]"
        if not isinstance(value, Mapping):
            return {"weight_bits": check_bits(where, value)}
        unknown = set(value) - {"weight_bits", "activation_bits", "activation_range"}
        if unknown:
            raise ValueError(
                f"`{where}` keys must be 'weight_bits' / 'activation_bits' / 'activation_range', got {sorted(unknown)}."
            )
        out: dict[str, Any] = {}
        if "activation_range" in value:
            out["activation_range"] = _check_range(f"{where}['activation_range']", value["activation_range"])
        if "weight_bits" in value:
            out["weight_bits"] = check_bits(f"{where}['weight_bits']", value["weight_bits"])
        if "activation_bits" in value:
            fixed = out.get("activation_range", self.activation_range)
            out["activation_bits"] = _check_activation_bits(
                f"{where}['activation_bits']", value["activation_bits"], fixed
            )
        return out


def prepare_qat(model: nn.Module, config: QATConfig | None = None) -> dict[str, nn.Module]:
    """Put fake quantizers on the Conv/Linear layers of ``model`` that ``config`` selects, in place.

    The layers observe their ranges in training mode and fake-quantize from their first observed batch on (switch
    with :func:`set_phase`). Calling it again on a prepared model changes nothing and returns its prepared layers.

    Returns:
        Name → layer for every prepared layer.

    Raises:
        ValueError: A pattern selects nothing, ``per_channel`` meets a 1-D weight, or an argument is out of range.
    """
    config = config or QATConfig()
    already = quantized_layers(model)
    if already:
        return already
    # A MultiheadAttention's out_proj is a Linear that the attention kernel reads directly (its forward never runs),
    # so it cannot be fake-quantized: it is left out, and named with the other layers that stay in float.
    attention = inside(model, (nn.MultiheadAttention,))
    selected = [(n, m) for n, m in select_modules(model, config.include, config.exclude) if n not in attention]
    if not selected:
        raise ValueError(
            f"No Conv/Linear module outside attention kernels is left to quantize in {type(model).__name__}."
        )
    if (message := not_compressed(model, "Quantization-aware training")) is not None:
        warnings.warn(message, UserWarning, stacklevel=2)
    check_overrides_match(selected, config.overrides, "layer_bits")
    names = [n for n, _ in selected]
    for name, layer in selected:
        if config.per_channel and layer.weight.dim() < 2:  # type: ignore[operator,union-attr]
            raise ValueError(f"per_channel=True needs a channel axis, but layer {name!r} has a 1-D weight.")
    pairs = find_conv_bn_pairs(model, names) if config.fold_bn else {}
    modules = dict(model.named_modules())
    for name, layer in selected:
        weight: Any = layer.weight
        bits: dict[str, Any] = {
            "weight_bits": config.weight_bits,
            "activation_bits": config.activation_bits,
            "activation_range": config.activation_range,
        }
        bits.update(match_overrides(name, config.overrides, selected) or {})
        w_spec = QuantSpec(bits["weight_bits"], config.weight_symmetric, config.per_channel, axis=0)
        fixed = bits["activation_range"]
        a_spec = QuantSpec(bits["activation_bits"], config.activation_symmetric and fixed is None, per_channel=False)
        input_quantizer = FakeQuantizer(
            a_spec,
            "minmax" if fixed is not None else config.observer,  # a fixed range is not learned
            averaging_constant=config.averaging_constant,
            fixed_range=fixed,
        )
        output_quantizer = None
        # A layer with a binary input computes on no integer grid (exported with Where, its bias in float): ONNX Runtime
        # has no integer kernel for it, and quantizing its output there cost ONNX parity (99.2 % in a test): not done.
        if config.quantize_outputs and bits["activation_bits"] > 1:
            out_bits = config.activation_bits if config.activation_range is None else 8
            output_quantizer = FakeQuantizer(
                QuantSpec(out_bits, config.activation_symmetric),
                config.observer,
                averaging_constant=config.averaging_constant,
            ).to(weight.device)
        attach(
            layer,
            FakeQuantizer(w_spec, config.observer, channels=weight.shape[0], weight=True).to(weight.device),
            input_quantizer.to(weight.device),
            modules[pairs[name]] if name in pairs else None,
            output_quantizer,
        )
    for module in model.modules():
        # In evaluation a TransformerEncoderLayer may run torch's fused kernel, which reads its Linear weights
        # directly and so would skip their fake quantization; a forward pre-hook keeps it on the Python path.
        if isinstance(module, nn.TransformerEncoderLayer) and _python_path not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_python_path)
    return dict(selected)


def _python_path(module: nn.Module, args: Any) -> None:
    """A no-op forward pre-hook: its presence makes a TransformerEncoderLayer compute through its own submodules."""


def layer_quantizers(layer: Any) -> list[FakeQuantizer]:
    """A prepared layer's quantizers: input, weight and (with ``quantize_outputs``) output."""
    return [q for q in (layer.input_quantizer, layer.weight_quantizer, getattr(layer, "output_quantizer", None)) if q]


def set_phase(layers: Mapping[str, nn.Module] | nn.Module, observing: bool, quantizing: bool) -> None:
    """Switch range observation and fake quantization of prepared layers (a model, or name → layer)."""
    found: dict[str, Any] = quantized_layers(layers) if isinstance(layers, nn.Module) else dict(layers)
    for layer in found.values():
        for q in layer_quantizers(layer):
            q.observing, q.quantizing = observing, quantizing


@contextlib.contextmanager
def float_phase(*models: nn.Module) -> Iterator[None]:
    """Within the block the prepared layers of ``models`` neither observe nor quantize (the plain layers'
    computation); each quantizer's own phase is restored after."""
    quantizers = [q for model in models for layer in quantized_layers(model).values() for q in layer_quantizers(layer)]
    phases = [(q.observing, q.quantizing) for q in quantizers]
    for q in quantizers:
        q.observing = q.quantizing = False
    try:
        yield
    finally:
        for q, (observing, quantizing) in zip(quantizers, phases, strict=True):
            q.observing, q.quantizing = observing, quantizing


def folded_batchnorms(layers: Mapping[str, nn.Module]) -> list[nn.Module]:
    """The BatchNorms folded into prepared layers (those whose statistics a freeze stops)."""
    return [bn for layer in layers.values() if (bn := getattr(layer, "_qat_bn", None)) is not None]


def unprepare(model: nn.Module) -> None:
    """Take every quantizer off ``model``: its layers are plain Conv/Linear (and BatchNorm) modules again."""
    for layer in quantized_layers(model).values():
        detach(layer)
    for module in model.modules():
        for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _python_path]:
            del module._forward_pre_hooks[key]


QUANTIZER_KEYS = (".weight_quantizer.", ".input_quantizer.", ".output_quantizer.")


def float_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A QAT model's (or checkpoint's) state dict without the quantizers' entries: it loads with ``strict=True`` into
    the unmodified model class, which then computes the float model with the trained weights (BatchNorm unfolded).

    To continue with the quantized model instead, prepare the unmodified model with the same :class:`QATConfig`
    (:func:`prepare_qat`) and load the whole state dict, also strictly.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 2))
        >>> _ = prepare_qat(net, QATConfig())
        >>> sorted(float_state_dict(net.state_dict()))
        ['0.bias', '0.weight']
    """
    return {k: v for k, v in state_dict.items() if not any(q in f".{k}" for q in QUANTIZER_KEYS)}
