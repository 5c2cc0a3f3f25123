"""Quantization-aware training without a Trainer: a config object and one verb, :func:`prepare_qat`.

    layers = prepare_qat(model, QATConfig(weight_bits=8))   # any nn.Module: fake quantizers on its Conv/Linear
    ...train as usual...                                     # ranges observed in training mode, then quantized
    export_onnx(model, "model.int8.onnx", example_input)     # the convert step: int8 QDQ ONNX, verified

:func:`set_phase` switches observation and fake quantization on or off (the callback drives it along the schedule);
:func:`unprepare` takes the quantizers off again; :func:`float_state_dict` turns a QAT checkpoint's state dict into one
that loads strictly into the unmodified model class.

A selected layer keeps its identity, its parameters and its place in the model: its class is swapped for a
subclass whose forward fake-quantizes the input activation and the weight, and two quantizer submodules are
added (``input_quantizer``, ``weight_quantizer``; ``output_quantizer`` where the layer's output is quantized). A
tensor that a residual addition reads or makes is quantized once by the module that makes it (a forward hook and an
``output_quantizer`` child), and a layer reading it shares that quantizer as its ``input_quantizer``
(:func:`quantization_plan`). The model's own ``state_dict`` keys are unchanged; the quantizers add theirs beside them
(scales, zero-points, observed ranges), so a checkpoint carries them.

**Conv + BatchNorm folding.** When a Conv feeds a BatchNorm directly, the weight that is quantized is the folded
one, ``w · γ/√(σ²+ε)`` (running statistics). While the BatchNorm trains with batch statistics, the conv output is
divided back by that factor so that the BatchNorm still normalises it (Jacob et al. 2018; Krishnamoorthi 2018).
Once the BatchNorm is in evaluation mode (in validation and test, and in training once frozen) the conv computes
the folded layer itself — ``conv(x, fq(w_fold)) + fq(b_fold)``, the bias on the int32 grid of the export — and
the BatchNorm passes its input on: PyTorch then computes what the exported integer model computes.
"""

from __future__ import annotations

import collections
import contextlib
import operator
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.core.compiled import accepts_compiled, unwrap_compiled
from lightning_compress.core.configs import QATConfig, resolve_config
from lightning_compress.core.layout import matrix_weight
from lightning_compress.core.quantizers import FakeQuantizer, MirroredQuantizer, QuantSpec, fake_quantize, quantize
from lightning_compress.core.selection import (
    EMBEDDING_TYPES,
    check_overrides_match,
    distinct_weights,
    inside,
    match_overrides,
    not_compressed,
    select_modules,
)

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MAX_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
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
    weight, bias = matrix_weight(layer), getattr(layer, "bias", None)  # an embedding has no bias
    if bn is None:
        return weight, bias
    factor = bn_factor(bn)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    bias0 = bias if bias is not None else torch.zeros_like(bn.running_mean)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    return weight * factor.reshape(shape), beta + (bias0 - bn.running_mean) * factor


@torch.no_grad()
def weight_integers(layer: Any) -> tuple[Tensor, Tensor, Tensor]:
    """The integers (int8 when symmetric, uint8 when affine), scales and zero-points of a prepared layer's weight —
    BatchNorm folded in — as its next forward quantizes it (a weight quantizer that observes reads the current weight
    first: its range is a function of the weights)."""
    weight, _ = folded_weight_and_bias(layer)
    quantizer = layer.weight_quantizer
    if quantizer.observing:
        quantizer.observe(weight)
    scale, zero_point = quantizer.qparams()
    dtype = torch.int8 if quantizer.spec.symmetric else torch.uint8
    return quantize(weight, scale, zero_point, quantizer.spec).to(dtype), scale, zero_point.to(dtype)


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
        if isinstance(self, _CONV_TYPES):
            return self._conv_forward(x, weight, bias)  # type: ignore[attr-defined]
        return F.linear(x, weight, bias)  # a Linear, or a Linear-like layer (its weight given in Linear layout)

    def forward(self, x: Tensor) -> Tensor:
        if not getattr(self, "_qat_input_shared", False):  # a shared input arrives quantized by its producer's hook
            x = self.input_quantizer(x)
        weight = matrix_weight(self)  # type: ignore[arg-type]
        bias: Tensor | None = self.bias  # type: ignore[attr-defined]
        bn: Any = self._qat_bn
        if not self.weight_quantizer.quantizing:
            # Float phases (before start_epoch, observer calibration): exactly the plain layer's computation;
            # the weight's range is still observed, BatchNorm folded in, so quantization starts calibrated.
            if self.weight_quantizer.observing:
                self.weight_quantizer(weight if bn is None else folded_weight_and_bias(self)[0].detach())
            y = self._compute(x, weight, bias)
            output_quantizer = getattr(self, "output_quantizer", None)
            if output_quantizer is not None and output_quantizer.calibrating:
                # Post-training calibration (quantize_, evaluation mode): the output quantizer records the tensor it
                # will quantize, the layer's output with its BatchNorm applied (running statistics, never updated).
                output_quantizer(y if bn is None else F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight,
                                                                    bn.bias, False, 0.0, bn.eps))  # fmt: skip
            elif output_quantizer is not None and output_quantizer.observing and bn is None:
                output_quantizer(y)  # QAT's observer calibration: the range of the output it will quantize (identity)
            return y
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
        quantizing = self._qat_conv.weight_quantizer.quantizing
        training: bool = self.training  # type: ignore[attr-defined]
        if not training and quantizing:
            return x
        y = super().forward(x)  # type: ignore[misc]
        output_quantizer = getattr(self._qat_conv, "output_quantizer", None)
        if training and output_quantizer is not None and (quantizing or output_quantizer.observing):
            # Training with batch statistics: the pair's output is this BatchNorm's, so the conv's output quantizer
            # (which in evaluation quantizes the folded conv's output) observes and quantizes it here — and only
            # observes it during the observer calibration that comes before quantizing.
            y = output_quantizer(y)
        return y


class _QATEmbeddingMixin(_Swapped):
    """Forward of an embedding whose table is fake-quantized: weight only, a scale per row (per token) — its input is
    token ids, its output the rows it looks up, which the layers reading them quantize as their input."""

    weight_quantizer: FakeQuantizer

    def forward(self, x: Tensor) -> Tensor:
        e: Any = self
        return F.embedding(x, self.weight_quantizer(e.weight), e.padding_idx, e.max_norm, e.norm_type,
                           e.scale_grad_by_freq, e.sparse)  # fmt: skip


class _GatedSiLUMixin(_Swapped):
    """``x · sigmoid(x)`` with the sigmoid computed by a child ``gate`` (an ``nn.Sigmoid``) whose output a tensor
    quantizer quantizes: the form ONNX Runtime runs as ``QLinearSigmoid`` → ``QLinearMul`` (SiLU, EfficientNet's
    activation) — computed in one float function, it would run between a DequantizeLinear and a QuantizeLinear."""

    gate: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


_MIXINS: dict[str, tuple[type, str]] = {
    "qat": (_QATMixin, "QAT"),
    "folded_bn": (_FoldedBatchNormMixin, "Folded"),
    "qat_embedding": (_QATEmbeddingMixin, "QAT"),
    "gated_silu": (_GatedSiLUMixin, "Gated"),
}


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
    """Whether ``module`` is a Conv/Linear layer that :func:`prepare_qat` fake-quantizes."""
    return isinstance(module, _QATMixin)


def quantized_embeddings(model: nn.Module) -> dict[str, Any]:
    """Name → embedding for every embedding whose table :func:`prepare_qat` fake-quantizes (weight only)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _QATEmbeddingMixin)}


def attach_embedding(embedding: nn.Module, weight_quantizer: FakeQuantizer) -> None:
    """Make ``embedding`` look up rows of its fake-quantized table. Idempotent."""
    if isinstance(embedding, _QATEmbeddingMixin):
        return
    embedding.__class__ = _swapped_class(type(embedding), _QATEmbeddingMixin, "QAT")
    embedding.add_module("weight_quantizer", weight_quantizer)
    weight_quantizer.train(embedding.training)


def detach_embedding(embedding: nn.Module) -> None:
    """Undo :func:`attach_embedding`."""
    if isinstance(embedding, _QATEmbeddingMixin):
        embedding.__class__ = embedding._original_class  # type: ignore[assignment]
        del embedding.weight_quantizer


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
    for quantizer in (weight_quantizer, input_quantizer, output_quantizer):
        if quantizer is not None:
            quantizer.train(layer.training)  # a model prepared in eval() observes no range until train()
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
    layer.__dict__.pop("_qat_input_shared", None)


def _quantize_output(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook of a tensor quantizer's host: its output, fake-quantized for every module that reads it."""
    quantizer: Any = module.output_quantizer
    return quantizer(output) if isinstance(output, Tensor) else output


def attach_tensor_quantizer(module: nn.Module, quantizer: nn.Module) -> None:
    """Quantize ``module``'s output with ``quantizer`` (a child ``output_quantizer`` and a forward hook): the tensor is
    quantized once, where it is made, for all its readers (a residual addition's inputs and output)."""
    module.add_module("output_quantizer", quantizer)
    quantizer.train(module.training)
    module.register_forward_hook(_quantize_output)


def tensor_quantizers(model: nn.Module) -> dict[str, Any]:
    """Module name → the quantizer of its output, for every module that hosts a tensor quantizer (the inputs and
    outputs of residual additions, see :func:`quantization_plan`)."""
    return {n: m.output_quantizer for n, m in model.named_modules() if _quantize_output in m._forward_hooks.values()}


def detach_tensor_quantizer(module: nn.Module) -> None:
    """Undo :func:`attach_tensor_quantizer`."""
    for key in [k for k, hook in module._forward_hooks.items() if hook is _quantize_output]:
        del module._forward_hooks[key]
    if hasattr(module, "output_quantizer"):
        del module.output_quantizer


def find_conv_bn_pairs(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Conv name → name of the BatchNorm that directly consumes its output.

    The model is traced with ``torch.fx`` when it can be; otherwise Conv→BatchNorm neighbours inside an
    ``nn.Sequential`` are paired. A Conv whose output is also used elsewhere is not paired (folding would change
    what the other consumer sees).
    """
    return quantization_plan(model, names).pairs


@dataclass
class QuantizationPlan:
    """Where a model's activations are quantized, read from its ``torch.fx`` graph (:func:`quantization_plan`).

    Attributes:
        pairs: Conv name → the BatchNorm folded into it.
        plain_outputs: Layers whose output needs no quantizer of its own: it reaches (through a ReLU at most) only
            other quantizers — the next layers' inputs, or a tensor quantizer below.
        tensor_hosts: Module name → why its output is quantized: the inputs and outputs of residual additions. Such
            a tensor is quantized once, by a forward hook on the module that produces it, for every reader.
        shared_inputs: Layer name → the module whose output quantizer is its input quantizer (already applied).
        mirrors: Tensor host → the host or layer whose quantizer's grid its tensor is already on (a max pooling of a
            quantized tensor): quantized there with that grid, by a :class:`MirroredQuantizer`.
        gates: SiLU modules of a quantized tensor, computed as ``x · gate(x)`` with the sigmoid ``gate`` a child
            module whose output is quantized (its name + ``.gate`` is a tensor host).
        unit_range: Tensor hosts whose tensor lies in [0, 1] (sigmoids): quantized on that fixed range.
        float_additions: Additions of a quantized layer's output that stay in float (a tensor no module produces
            alone, e.g. a function's result at the model's top level), as ``"node (reason)"``.
        traced: Whether the model could be traced (without a trace: every layer's output is quantized, additions
            stay in float).
    """

    pairs: dict[str, str] = field(default_factory=dict)
    plain_outputs: set[str] = field(default_factory=set)
    tensor_hosts: dict[str, str] = field(default_factory=dict)
    shared_inputs: dict[str, str] = field(default_factory=dict)
    mirrors: dict[str, str] = field(default_factory=dict)
    gates: set[str] = field(default_factory=set)
    unit_range: set[str] = field(default_factory=set)
    float_additions: list[str] = field(default_factory=list)
    traced: bool = True


_ADDITIONS = {operator.add, operator.iadd, torch.add}
# Activations ONNX Runtime drops after a QuantizeLinear whose range they cannot change (Relu, Clip from 0): the tensor
# after them is quantized, so that a conv, its activation and the quantization fuse into one integer kernel.
_RELUS = {torch.relu, torch.relu_, F.relu, F.relu6}


def _trace(model: nn.Module) -> Any:
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, (*_CONV_TYPES, *_BN_TYPES)) or super().is_leaf_module(m, qualname)

        def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
            inner = unwrap_compiled(m)  # a torch.compile'd submodule: trace the module it wraps (`<name>._orig_mod`)
            if inner is not m:
                return super().call_module(inner, inner.forward, args, kwargs)
            return super().call_module(m, forward, args, kwargs)

    return _Tracer().trace(model)


def quantization_plan(
    model: nn.Module, names: Sequence[str], fold_bn: bool = True, residuals: bool = False
) -> QuantizationPlan:
    """Read from ``model``'s ``torch.fx`` graph which BatchNorm folds into which conv and — with ``residuals`` — where
    activations are quantized so that ONNX Runtime runs the whole network on integer kernels:

    * a residual addition ``a + b`` of a quantized layer's output (a Conv after its folded BatchNorm, say) gets its
      other input and its output (after the ReLU that reads it alone) quantized at the module that produces each —
      exported as ``DequantizeLinear`` → ``Add`` → ``QuantizeLinear`` (ONNX Runtime's ``QLinearAdd``);
    * a layer whose output reaches only quantizers (the next layers' inputs, through a ReLU at most) gets no output
      quantizer of its own: quantizing twice would cost accuracy and a float round trip in ONNX Runtime;
    * a layer whose input is such a quantized tensor shares that quantizer (:attr:`QuantizationPlan.shared_inputs`).

    A model that cannot be traced gets the Sequential Conv→BatchNorm pairs and no residual plan (``traced=False``).
    Without ``fold_bn`` nothing is paired (a layer's output is then the conv's own).
    """
    modules = dict(model.named_modules())
    wanted = set(names)
    try:
        graph = _trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure falls back to the structural rule below
        convs = {n for n in wanted if isinstance(modules[n], _CONV_TYPES)}
        return QuantizationPlan(pairs=_pairs_in_sequentials(modules, convs) if fold_bn else {}, traced=False)
    nodes = list(graph.nodes)
    calls = collections.Counter(n.target for n in nodes if n.op == "call_module")
    plan = QuantizationPlan()
    ends: dict[Any, str] = {}  # node → the quantized layer whose (BatchNorm-folded) output it is
    for node in nodes:
        if node.op != "call_module" or node.target not in wanted:
            continue
        end = node
        if fold_bn and isinstance(modules[node.target], _CONV_TYPES) and len(node.users) == 1:
            (user,) = node.users
            if user.op == "call_module" and isinstance(modules.get(user.target), _BN_TYPES):
                plan.pairs[node.target] = user.target
                end = user
        if calls[node.target] == 1:
            ends[end] = node.target
    if not residuals:
        return plan
    hosts: dict[Any, str] = {}
    feeds_addition: set[str] = set()
    scopes = {n: _scope_paths(n) for n in nodes}  # read once: the host search asks for them per node and reader
    for node in nodes:
        if not _is_addition(node) or not any(a in ends for a in node.args[:2]):
            continue
        tensors = [_through_identities(a, modules) for a in node.args[:2] if a not in ends]
        tensors.append(_relu_after(node, modules) or node)
        found = {t: _host(t, modules, calls, ends, scopes) for t in tensors}
        missing = [str(t) for t, host in found.items() if host is None]
        if missing:
            plan.float_additions.append(f"{node} (no single module produces {', '.join(missing)})")
            continue
        hosts.update(found)  # type: ignore[arg-type]
        plan.tensor_hosts.update({host: f"residual addition {node}" for host in found.values()})  # type: ignore[misc]
        feeds_addition.update(ends[a] for a in node.args[:2] if a in ends)
    layer_nodes = {n.target: n for n in nodes if n.op == "call_module" and n.target in ends.values()}
    for end, name in ends.items():
        relu = _relu_after(end, modules)
        tensor = relu or end
        readers = list(tensor.users)
        only_quantizers = tensor in hosts or all(
            u.op == "call_module" and u.target in layer_nodes and u.args[0] is tensor for u in readers
        )
        if readers and only_quantizers and name not in feeds_addition and (len(readers) == 1 or tensor in hosts):
            plan.plain_outputs.add(name)
        elif relu is not None and name not in feeds_addition and relu.op == "call_module" and calls[relu.target] == 1:
            # Read by something other than layers (a pooling, a flatten), or by several layers (which must read one
            # grid: ONNX Runtime fuses a conv with its QuantizeLinear only when that is its one reader): quantized
            # after its ReLU/ReLU6 module, so that conv, activation and quantization fuse into one integer kernel
            # (quantized before the activation, the activation would run in float after a DequantizeLinear).
            hosts[relu] = relu.target
            plan.tensor_hosts[relu.target] = f"output of {name} after its activation"
            plan.plain_outputs.add(name)
    _plan_gates(plan, nodes, modules, calls, ends, hosts, scopes)
    for node, host in hosts.items():
        pooled = _max_pooled(node, modules)
        if pooled is not None and (source := _quantizer_of(pooled, hosts, ends, plan)) is not None:
            plan.mirrors[host] = source
    for name, node in layer_nodes.items():
        if not node.args:
            continue
        if node.args[0] in hosts:
            plan.shared_inputs[name] = hosts[node.args[0]]
        elif _pooled(node.args[0], modules, calls, hosts):
            # A max pooling between a quantized tensor and this layer (a CNN's stage boundary): quantized on the
            # grid of what it pools (a mirror) and shared, so that ONNX Runtime pools the integers.
            pool = node.args[0]
            plan.mirrors[pool.target] = hosts[pool.args[0]]
            hosts[pool] = pool.target
            plan.tensor_hosts[pool.target] = f"max pooling of the output of {plan.mirrors[pool.target]}"
            plan.shared_inputs[name] = pool.target
        elif (producer := ends.get(node.args[0])) is not None and producer not in plan.plain_outputs:
            # A layer that reads another layer's quantized output directly (a block's last conv feeding the next
            # block and a residual addition) reads it on that grid: quantizing it again would add a
            # DequantizeLinear → QuantizeLinear round trip between two integer kernels.
            plan.shared_inputs[name] = producer
    return plan


_MULTIPLICATIONS = {operator.mul, operator.imul, torch.mul}


def _plan_gates(
    plan: QuantizationPlan,
    nodes: Sequence[Any],
    modules: dict[str, nn.Module],
    calls: Mapping[Any, int],
    ends: Mapping[Any, str],
    hosts: dict[Any, str],
    scopes: Mapping[Any, set[str]],
) -> None:
    """Quantize the tensors of the gates ONNX Runtime runs on integers when each is quantized — in model order, so
    that a gate's quantized output makes the next one's input quantized: a SiLU of a quantized tensor (its sigmoid and
    its product: ``QLinearSigmoid``, ``QLinearMul``), and a sigmoid module of one that scales another quantized tensor
    (squeeze-and-excitation's ``scale * input``: the sigmoid and the product)."""

    def quantized(node: Any) -> bool:
        return hasattr(node, "op") and _quantizer_of(_through_identities(node, modules), hosts, ends, plan) is not None

    for node in nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        once = module is not None and calls[node.target] == 1 and bool(node.args)
        if once and isinstance(module, nn.SiLU) and quantized(node.args[0]):
            plan.gates.add(node.target)
            plan.tensor_hosts[f"{node.target}.gate"] = f"the sigmoid of SiLU {node.target}"
            plan.unit_range.add(f"{node.target}.gate")
            plan.tensor_hosts[node.target] = f"output of SiLU {node.target}"
            hosts[node] = node.target
        elif once and isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)) and quantized(node.args[0]):
            # a sigmoid's quantized output pays only where an integer multiplication reads it: squeeze-and-excitation's
            # ``scale * input`` with the input quantized (else it would add a requantization, not remove one)
            (user, *more) = list(node.users) or [None]
            other = [a for a in (user.args[:2] if _is_multiplication(user) and not more else ()) if a is not node]
            host = _host(user, modules, calls, ends, scopes) if other and quantized(other[0]) else None
            if host is not None and host not in plan.tensor_hosts:
                plan.tensor_hosts[node.target] = f"output of sigmoid {node.target}"
                plan.unit_range.add(node.target)
                hosts[node] = node.target
                plan.tensor_hosts[host] = f"product {user}"
                hosts[user] = host


def _is_multiplication(node: Any) -> bool:
    return node is not None and (
        (node.op == "call_function" and node.target in _MULTIPLICATIONS)
        or (node.op == "call_method" and node.target in ("mul", "mul_"))
    ) and len(node.args) >= 2 and all(hasattr(a, "op") for a in node.args[:2])  # fmt: skip


def _quantizer_of(node: Any, hosts: Mapping[Any, str], ends: Mapping[Any, str], plan: QuantizationPlan) -> str | None:
    """The module whose quantizer quantizes the tensor ``node`` (a tensor host, or a layer with an output quantizer of
    its own), or ``None``."""
    if node in hosts:
        return hosts[node]
    return ends[node] if node in ends and ends[node] not in plan.plain_outputs else None


def _max_pooled(node: Any, modules: dict[str, nn.Module]) -> Any:
    """The input of ``node`` when it is a max pooling module's call, else ``None``."""
    pooling = node.op == "call_module" and isinstance(modules.get(node.target), _MAX_POOLS) and node.args
    return node.args[0] if pooling else None


def _pooled(node: Any, modules: dict[str, nn.Module], calls: Mapping[Any, int], hosts: Mapping[Any, str]) -> bool:
    """Whether ``node`` is a max pooling module (called once) of a tensor that a host quantizes."""
    return _max_pooled(node, modules) in hosts and calls[node.target] == 1


def _is_addition(node: Any) -> bool:
    import torch.fx

    adds = (node.op == "call_function" and node.target in _ADDITIONS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    return adds and len(node.args) >= 2 and all(isinstance(a, torch.fx.Node) for a in node.args[:2])


def _relu_after(node: Any, modules: dict[str, nn.Module]) -> Any:
    """The ReLU (or ReLU6, or Hardtanh from 0: a Clip that keeps 0) that is the only reader of ``node``, or
    ``None``."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    relu = (
        (
            user.op == "call_module"
            and (
                isinstance(module := modules.get(user.target), nn.ReLU)
                or (isinstance(module, nn.Hardtanh) and module.min_val == 0)
            )
        )
        or (user.op == "call_function" and user.target in _RELUS)
        or (user.op == "call_method" and user.target in ("relu", "relu_"))
    )
    return user if relu else None


def _through_identities(node: Any, modules: dict[str, nn.Module]) -> Any:
    """The tensor an ``nn.Identity`` (an identity shortcut, say) passes on: quantized where it is made."""
    while node.op == "call_module" and isinstance(modules.get(node.target), nn.Identity) and node.args:
        node = node.args[0]
    return node


def _scope_paths(node: Any) -> set[str]:
    return {path for path, _ in (node.meta.get("nn_module_stack") or {}).values()}


def _host(node: Any, modules: dict[str, nn.Module], calls: Mapping[Any, int], ends: Mapping[Any, str],
          scopes: Mapping[Any, set[str]]) -> str | None:  # fmt: skip
    """The module, called once, whose output ``node`` is (its forward hook can quantize the tensor), or ``None``: the
    module ``node`` calls, or else the innermost module scope it is the one output of (a residual block whose ReLU
    module is called twice, as in torchvision's ResNet, hosts its own output). ``scopes``: every node's module paths."""
    if node in ends or node.op == "placeholder":
        return None
    if node.op == "call_module" and calls[node.target] == 1:
        return str(node.target)
    stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    for path in reversed(stack):
        if not path or any(path in scopes[u] for u in node.users):
            continue  # ``node`` does not leave this scope: not its output
        leaving = [n for n, paths in scopes.items() if path in paths and any(path not in scopes[u] for u in n.users)]
        if leaving == [node] and calls[path] == 0 and path in modules:  # a scope called once (a leaf: called twice)
            return path
    return None


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
    """Name → layer for every fake-quantized Conv/Linear layer of ``model`` (embeddings:
    :func:`quantized_embeddings`)."""
    return {n: m for n, m in model.named_modules() if is_quantized(m)}


@accepts_compiled()
def prepare_qat(
    model: nn.Module, config: QATConfig | Mapping[str, Any] | None = None, **fields: Any
) -> dict[str, nn.Module]:
    """Put fake quantizers on the Conv/Linear layers of ``model`` that ``config`` selects, in place (a
    :class:`QATConfig`, a mapping of its fields, or keyword ``fields``, which override it).

    The layers observe their ranges in training mode and fake-quantize from their first observed batch on (switch
    with :func:`set_phase`). Calling it again on a prepared model changes nothing and returns its prepared layers.

    Returns:
        Name → layer for every prepared layer.

    Raises:
        ValueError: A pattern selects nothing, ``per_channel`` meets a 1-D weight, or an argument is out of range.
    """
    config = resolve_config(QATConfig, config, "weight_bits", fields)
    already = {**quantized_layers(model), **quantized_embeddings(model)}
    if already:
        return already
    # A MultiheadAttention's out_proj is a Linear that the attention kernel reads directly (its forward never runs),
    # so it cannot be fake-quantized: it is left out, and named with the other layers that stay in float.
    attention = inside(model, (nn.MultiheadAttention,))
    chosen = [(n, m) for n, m in select_modules(model, config.include, config.exclude) if n not in attention]
    distinct_weights(chosen, config.overrides, "layer_bits")  # a tied weight given two widths is refused
    tables = [(n, m) for n, m in chosen if isinstance(m, EMBEDDING_TYPES)]
    selected = [(n, m) for n, m in chosen if not isinstance(m, EMBEDDING_TYPES)]
    if not chosen:
        raise ValueError(
            f"No Conv/Linear module outside attention kernels is left to quantize in {type(model).__name__}."
        )
    if (message := not_compressed(model, "Quantization-aware training", chosen, writes=False)) is not None:
        warnings.warn(message, UserWarning, stacklevel=2)
    check_overrides_match(chosen, config.overrides, "layer_bits")

    def bits_of(name: str) -> dict[str, Any]:  # the config's widths and range, with the layer's own overrides
        own = match_overrides(name, config.overrides, chosen) or {}
        return {"weight_bits": config.weight_bits, "activation_bits": config.activation_bits,
                "activation_range": config.activation_range, **own}  # fmt: skip

    for name, table in tables:
        spec = QuantSpec(bits_of(name)["weight_bits"], config.weight_symmetric, config.per_channel, axis=0)  # per row
        table_weight: Tensor = table.weight  # type: ignore[assignment]
        quantizer = FakeQuantizer(spec, config.observer, channels=table_weight.shape[0], weight=True)
        attach_embedding(table, quantizer.to(table_weight.device))
    if not selected:
        return dict(tables)
    names = [n for n, _ in selected]
    for name, layer in selected:
        if config.per_channel and matrix_weight(layer).dim() < 2:
            raise ValueError(f"per_channel=True needs a channel axis, but layer {name!r} has a 1-D weight.")
    plan = quantization_plan(model, names, config.fold_bn, residuals=config.quantize_outputs)
    if config.quantize_outputs and not plan.traced:
        warnings.warn(
            f"{type(model).__name__} could not be traced with torch.fx: every quantized layer's output is quantized "
            "and residual additions stay in float (ONNX Runtime runs them with float round trips, more slowly).",
            UserWarning,
            stacklevel=2,
        )
    if plan.float_additions:
        warnings.warn(
            f"quantize_outputs: {len(plan.float_additions)} addition(s) of quantized layers' outputs stay in float in "
            f"the int8 export: {'; '.join(plan.float_additions)}. Compute such a sum inside a module (e.g. end a "
            "residual block with an nn.ReLU module, or return the sum from the block's forward).",
            UserWarning,
            stacklevel=2,
        )
    pairs = plan.pairs
    modules = dict(model.named_modules())
    out_bits = config.activation_bits if config.activation_range is None else 8
    device = next(model.parameters()).device

    def activation_quantizer(bits: int) -> FakeQuantizer:
        spec = QuantSpec(bits, config.activation_symmetric)
        return FakeQuantizer(spec, config.observer, averaging_constant=config.averaging_constant).to(device)

    for name in plan.gates:  # x · gate(x): the sigmoid a module of its own, whose output is quantized
        silu = modules[name]
        silu.__class__ = _swapped_class(type(silu), _GatedSiLUMixin, "Gated")
        silu.add_module("gate", nn.Sigmoid())
    modules = dict(model.named_modules())
    unit = QuantSpec(out_bits, symmetric=False)
    hosted: dict[str, nn.Module] = {
        name: FakeQuantizer(unit, fixed_range=(0.0, 1.0)).to(device)
        if name in plan.unit_range
        else activation_quantizer(out_bits)
        for name in plan.tensor_hosts
        if name not in plan.mirrors
    }
    # A layer's own output quantizer (made before the loop: a layer later in the model may read that output on it).
    outputs = {
        name: activation_quantizer(out_bits)
        for name in names
        if config.quantize_outputs and name not in plan.plain_outputs and bits_of(name)["activation_bits"] > 1
    }
    for name, source in plan.mirrors.items():  # a max pooling of a quantized tensor: already on its grid
        hosted[name] = MirroredQuantizer(hosted.get(source) or outputs[source])
    for name in plan.tensor_hosts:
        attach_tensor_quantizer(modules[name], hosted[name])
    for name, layer in selected:
        weight = matrix_weight(layer)
        bits = bits_of(name)
        w_spec = QuantSpec(bits["weight_bits"], config.weight_symmetric, config.per_channel, axis=0)
        fixed = bits["activation_range"]
        a_spec = QuantSpec(bits["activation_bits"], config.activation_symmetric and fixed is None, per_channel=False)
        source = plan.shared_inputs.get(name, "")
        shared: Any = hosted.get(source) or outputs.get(source)
        if shared is not None and (fixed is not None or shared.spec != a_spec):
            shared = None  # the layer's own activation settings: it quantizes its input again, as configured
        input_quantizer = shared or FakeQuantizer(
            a_spec,
            "minmax" if fixed is not None else config.observer,  # a fixed range is not learned
            averaging_constant=config.averaging_constant,
            fixed_range=fixed,
        )
        # A layer with a binary input computes on no integer grid (exported with Where, its bias in float): ONNX Runtime
        # has no integer kernel for it, and quantizing its output there cost ONNX parity (99.2 % in a test): not done.
        output_quantizer = outputs.get(name)
        attach(
            layer,
            FakeQuantizer(w_spec, config.observer, channels=weight.shape[0], weight=True).to(weight.device),
            input_quantizer.to(weight.device),
            modules[pairs[name]] if name in pairs else None,
            output_quantizer,
        )
        if shared is not None:
            object.__setattr__(layer, "_qat_input_shared", True)
    for module in model.modules():
        # In evaluation a TransformerEncoderLayer may run torch's fused kernel, which reads its Linear weights
        # directly and so would skip their fake quantization; a forward pre-hook keeps it on the Python path.
        if isinstance(module, nn.TransformerEncoderLayer) and _python_path not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_python_path)
    return {**dict(tables), **dict(selected)}


def _python_path(module: nn.Module, args: Any) -> None:
    """A no-op forward pre-hook: its presence makes a TransformerEncoderLayer compute through its own submodules."""


def layer_quantizers(layer: Any) -> list[FakeQuantizer]:
    """A prepared layer's quantizers: input, weight and (with ``quantize_outputs``) output; an embedding's weight."""
    found = (getattr(layer, "input_quantizer", None), layer.weight_quantizer, getattr(layer, "output_quantizer", None))
    return [q for q in found if isinstance(q, FakeQuantizer)]  # a mirror (a pooled tensor's grid) has no state


def all_quantizers(model: nn.Module) -> list[FakeQuantizer]:
    """Every quantizer of a prepared model, once each: its layers' and embeddings' and its tensor quantizers (a
    quantizer that a layer shares as its input is listed once)."""
    layers = {**quantized_layers(model), **quantized_embeddings(model)}
    found = [q for layer in layers.values() for q in layer_quantizers(layer)]
    found += [q for q in tensor_quantizers(model).values() if isinstance(q, FakeQuantizer)]  # a mirror has no state
    return list({id(q): q for q in found}.values())


def set_phase(layers: Mapping[str, nn.Module] | nn.Module, observing: bool, quantizing: bool) -> None:
    """Switch range observation and fake quantization of a prepared model (all its quantizers), or of the prepared
    layers of a name → layer mapping."""
    if isinstance(layers, nn.Module):
        quantizers = all_quantizers(layers)
    else:
        quantizers = [q for layer in layers.values() for q in layer_quantizers(layer)]
    for q in quantizers:
        q.observing, q.quantizing = observing, quantizing


@contextlib.contextmanager
def float_phase(*models: nn.Module) -> Iterator[None]:
    """Within the block the prepared layers of ``models`` neither observe nor quantize (the plain layers'
    computation); each quantizer's own phase is restored after."""
    quantizers = [q for model in models for q in all_quantizers(model)]
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
    for embedding in quantized_embeddings(model).values():
        detach_embedding(embedding)
    for name in tensor_quantizers(model):
        detach_tensor_quantizer(model.get_submodule(name))
    for module in model.modules():
        if isinstance(module, _GatedSiLUMixin):
            module.__class__ = module._original_class  # type: ignore[assignment]
            del module.gate
        for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _python_path]:
            del module._forward_pre_hooks[key]


QUANTIZER_KEYS = (".weight_quantizer.", ".input_quantizer.", ".output_quantizer.")


def _is_quantizer_key(key: str) -> bool:
    """Whether a state dict entry belongs to a quantizer (its name has a quantizer module in its path)."""
    return any(q in f".{key}" for q in QUANTIZER_KEYS)


#: Where a QuantizationAwareTraining checkpoint keeps the quantizers' entries, beside (not in) its ``state_dict``: the
#: ``state_dict`` is the float model's, so ``MyModel.load_from_checkpoint(path)`` loads the plain class.
CHECKPOINT_QUANTIZERS = "lightning_compress/quantizers"


def quantizer_entries(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The quantizers' entries of a QAT model's state dict (the complement of :func:`float_state_dict`)."""
    return {k: v for k, v in state_dict.items() if _is_quantizer_key(k)}


def qat_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The whole state dict of the quantized model from a Lightning checkpoint a QuantizationAwareTraining run wrote:
    its ``state_dict`` (the float model's) with the quantizers' entries it keeps beside it. Load it strictly into the
    unmodified class prepared with the same :class:`QATConfig` (:func:`prepare_qat`) to continue with the quantized
    model; ``checkpoint["state_dict"]`` alone loads into the unmodified class (the float model)."""
    return {**checkpoint["state_dict"], **checkpoint.get(CHECKPOINT_QUANTIZERS, {})}


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
    return {k: v for k, v in state_dict.items() if not _is_quantizer_key(k)}
