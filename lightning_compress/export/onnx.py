"""The real integer model: ONNX with QuantizeLinear/DequantizeLinear, int8 weights, run in ONNX Runtime.

:func:`export_onnx` builds the *export form* of a fake-quantized model — BatchNorms folded into their convs,
every quantized layer holding exactly the dequantized grid values it trained with — exports it with
``torch.onnx.export(dynamo=True)`` and then rewrites the graph around every quantized Conv/Gemm:

* the float weight initializer becomes an **int8 initializer** → ``DequantizeLinear`` (per channel, axis 0),
* the bias becomes an int32 initializer on the grid ``input_scale × weight_scale`` → ``DequantizeLinear``,
* the data input passes ``QuantizeLinear`` → ``DequantizeLinear`` with the layer's activation scale and
  zero-point (uint8 for unsigned activations; a ``Clip`` first when fewer than 8 bits are used) — unless it shares
  the quantizer of the tensor it reads, which already comes out of one,
* with an output quantizer, the layer's output passes its own pair;

and after the output of every module that hosts a tensor quantizer (a residual addition's inputs and output), found
by the exporter's module scopes. Each such tensor gets one pair, read by all its readers.

That is the standard QDQ form ONNX Runtime recognises. :func:`onnx_parity` runs the file in ONNX Runtime next to
the fake-quantized PyTorch model and reports how often their top-1 predictions agree.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_compress.core.compiled import accepts_compiled
from lightning_compress.core.layout import TRANSPOSED, matrix_weight, weight_layout
from lightning_compress.core.metrics import top1
from lightning_compress.core.quantizers import QuantSpec
from lightning_compress.quantization.prepare import (
    detach,
    detach_embedding,
    folded_weight_and_bias,
    quantized_embeddings,
    quantized_layers,
    tensor_quantizers,
    weight_integers,
)

PARITY_GOAL = 0.995


def _copy_module(model: nn.Module) -> nn.Module:
    trainer = getattr(model, "_trainer", None)
    memo = {id(trainer): None} if trainer is not None else {}
    return copy.deepcopy(model, memo)


@dataclass(frozen=True)
class QuantizedLayerExport:
    """What the integer model holds for one quantized layer: the record :func:`export_form` gives, which the ONNX
    rewrite and the compact artifact (:func:`~lightning_compress.save_compressed`) both read."""

    weight_int: Tensor  #: int8 (symmetric) or uint8 (affine) integers of the (BatchNorm-folded) weight
    weight_scale: Tensor  #: float32, one per output channel (or one)
    weight_zero_point: Tensor  #: int8/uint8 like ``weight_int`` (zeros when symmetric)
    weight_spec: QuantSpec
    bias: Tensor | None  #: the folded bias in float (exported as int32 on the grid input_scale × weight_scale)
    input_scale: float
    input_zero_point: int
    input_spec: QuantSpec
    input_range: tuple[float, float] | None  #: a fixed (bounded) activation range, else ``None``
    input_shared: bool  #: the input arrives quantized by its producer's tensor quantizer
    output: tuple[float, int, QuantSpec] | None  #: the layer's output grid (scale, zero-point, spec), if quantized


@dataclass(frozen=True)
class QuantizedTableExport:
    """What the integer model holds for one quantized embedding: its table's integers, a scale (and zero-point) per
    row; the export looks up the integer rows and dequantizes only those (``Gather`` → ``Cast`` → ``Mul``)."""

    weight_int: Tensor  #: int8 (symmetric) or uint8 (affine) integers of the table, (rows, dim)
    weight_scale: Tensor  #: float32, one per row (or one)
    weight_zero_point: Tensor  #: like ``weight_int`` (zeros when symmetric)
    weight_spec: QuantSpec


@torch.no_grad()
def export_form(
    model: nn.Module,
) -> tuple[nn.Module, dict[str, QuantizedLayerExport], dict[str, QuantizedTableExport]]:
    """A float copy of ``model`` that computes what the integer model computes, and each layer's integers.

    Returns the copy (BatchNorms that were folded replaced by ``nn.Identity``, quantizers removed, each quantized
    layer's weight set to its dequantized grid values and its bias to the folded bias; a tensor quantizer replaced by
    its parameters, :class:`TensorQParams`, which the ONNX rewrite turns into Q/DQ); per layer name, the int
    weights, their scales, the folded bias and the activation quantization parameters; and per quantized embedding,
    its table's integers and scales.
    """
    layers = quantized_layers(model)
    tables = quantized_embeddings(model)
    if not layers and not tables:
        raise ValueError(
            "export_onnx: the model has no quantized layers. Train it with QuantizationAwareTraining first."
        )
    hosts = tensor_quantizers(model)
    not_ready = [n for n, m in layers.items() if not (m.input_quantizer.initialized and m.weight_quantizer.initialized)]
    not_ready += [n for n, m in tables.items() if not m.weight_quantizer.initialized]
    not_ready += [n for n, q in hosts.items() if not q.initialized]
    not_ready += [n for n, m in layers.items() if (q := getattr(m, "output_quantizer", None)) and not q.initialized]
    if not_ready:
        raise ValueError(
            f"export_onnx: no quantized training step has run yet (layers {not_ready[:3]} have observed no range). "
            "Export after QuantizationAwareTraining's start_epoch and calibration steps."
        )
    was_training = model.training
    model.eval()
    info: dict[str, QuantizedLayerExport] = {}
    bn_names = {}
    module_names = {id(m): n for n, m in model.named_modules()}
    for name, layer in layers.items():
        _, bias = folded_weight_and_bias(layer)
        ints, w_scale, w_zp = weight_integers(layer)
        a_scale, a_zp = layer.input_quantizer.qparams()
        info[name] = QuantizedLayerExport(
            # signed symmetric weights as int8; affine (weight_symmetric=False) as uint8 with their zero-points
            weight_int=ints,
            weight_scale=w_scale.clone(),
            weight_zero_point=w_zp.clone(),
            weight_spec=layer.weight_quantizer.spec,
            bias=None if bias is None else bias.detach().float().clone(),
            input_scale=float(a_scale.reshape(-1)[0]),
            input_zero_point=int(a_zp.reshape(-1)[0]),
            input_spec=layer.input_quantizer.spec,
            input_range=layer.input_quantizer.fixed_range,
            input_shared=bool(getattr(layer, "_qat_input_shared", False)),  # already quantized by its producer
            output=_output_qparams(layer),
        )
        if layer._qat_bn is not None:
            bn_names[name] = module_names[id(layer._qat_bn)]
    rows = {}
    for name, table in tables.items():
        ints, w_scale, w_zp = weight_integers(table)
        rows[name] = QuantizedTableExport(ints, w_scale.clone(), w_zp.clone(), table.weight_quantizer.spec)
    model.train(was_training)

    form = _copy_module(model).eval()
    modules = dict(form.named_modules())
    for name, data in info.items():
        layer = modules[name]
        detach(layer)
        if weight_layout(layer) == TRANSPOSED:  # a Linear-like layer (Hugging Face's Conv1D) is written as a Linear
            layer = modules[name] = _as_linear(form, name, layer)
        layer.weight.data = _dequantized(data).to(layer.weight.dtype)
        if data.bias is not None:
            layer.bias = nn.Parameter(data.bias.to(layer.weight.dtype))
        if name in bn_names:
            parent_name, _, child = bn_names[name].rpartition(".")
            setattr(modules[parent_name] if parent_name else form, child, nn.Identity())
    for name, row_data in rows.items():
        table = modules[name]
        detach_embedding(table)
        table.weight.data = _dequantized(row_data).to(table.weight.dtype)
    for name, quantizer in hosts.items():  # tensor quantizers: their parameters; the ONNX rewrite inserts them
        scale, zero_point = quantizer.qparams()
        params = TensorQParams(float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0]), quantizer.spec)
        modules[name].output_quantizer = params
    return form, info, rows


def _dequantized(data: QuantizedLayerExport | QuantizedTableExport) -> Tensor:
    """The float values of a quantized weight, ``(q − zero_point) · scale`` per output channel (per row)."""
    shape = (-1,) + (1,) * (data.weight_int.dim() - 1)
    ints = data.weight_int.float() - data.weight_zero_point.float().reshape(shape)
    return ints * data.weight_scale.reshape(shape)


def _as_linear(form: nn.Module, name: str, layer: nn.Module) -> nn.Linear:
    """Put an ``nn.Linear`` computing what the Linear-like ``layer`` computes in its place in ``form``."""
    weight = matrix_weight(layer).detach()
    bias = layer._parameters.get("bias")
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    linear.weight.data.copy_(weight)
    if bias is not None:
        linear.bias.data.copy_(bias.detach())
    linear.train(layer.training)
    parent, _, child = name.rpartition(".")
    setattr(form.get_submodule(parent) if parent else form, child, linear)
    return linear


class TensorQParams(nn.Module):
    """A tensor quantizer's scale and zero-point in the export form (buffers, so the compact artifact stores them).
    Its forward passes the tensor on: :func:`export_onnx` writes ``QuantizeLinear`` → ``DequantizeLinear`` after the
    host module's output in the ONNX graph. (``torch.fake_quantize_per_tensor_affine`` would export as Q/DQ itself,
    but not with a dynamic batch dimension in torch 2.13: its kernel has no meta implementation.)"""

    def __init__(self, scale: float, zero_point: int, spec: Any) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.int32))
        self.qparams = (float(scale), int(zero_point))
        self.spec = spec

    def forward(self, x: Tensor) -> Tensor:
        return x


def _output_qparams(layer: Any) -> tuple[float, int, Any] | None:
    quantizer = getattr(layer, "output_quantizer", None)
    if quantizer is None or not quantizer.initialized:
        return None
    scale, zero_point = quantizer.qparams()
    return float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0]), quantizer.spec


def _check_input(form: nn.Module, example_input: Tensor) -> None:
    try:
        with torch.no_grad():
            form(example_input)
    except Exception as err:  # noqa: BLE001 - reported in one line, not as an exporter stack trace
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"export_onnx: `example_input` of shape {tuple(example_input.shape)} does not fit the model ({first})."
        ) from None


class ExportMismatchError(ValueError):
    """The exported ONNX file would not compute what the model computes (nothing was written)."""


@accepts_compiled()
def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: Tensor) -> Path:
    """Write the QAT model as ONNX with QuantizeLinear/DequantizeLinear and int8 weight initializers — after checking
    in ONNX Runtime that the file computes what the model computes on ``example_input``.

    The file is built in memory, run in ONNX Runtime on ``example_input`` next to the fake-quantized model, and only
    written when their top-1 predictions agree (a sample whose two best logits are closer than numerical noise may
    go either way) on at least :data:`PARITY_GOAL` of the examples. Pass a representative batch: the check is as good
    as the examples.

    Args:
        model: The LightningModule or ``nn.Module`` after quantization-aware training (or :func:`prepare_qat`).
        path: Where to write the ``.onnx`` file.
        example_input: One input batch (its first dimension is exported as dynamic).

    Raises:
        TypeError: ``example_input`` is not a tensor.
        ValueError: No quantized step has run yet, or ``example_input`` does not fit the model (one line each).
        ExportMismatchError: ONNX Runtime disagrees with the model on the examples; nothing is written.
    """
    import onnx

    if not isinstance(example_input, Tensor):
        raise TypeError(
            f"export_onnx: `example_input` must be a torch.Tensor batch, got {type(example_input).__name__} "
            "(convert it with torch.as_tensor)."
        )
    form, info, tables = export_form(model)
    example_input = example_input.detach().to(next(form.parameters()).device)
    _check_input(form, example_input)
    batch = torch.export.Dim("batch", min=1)
    # optimize=False: the exporter's optimizer folds a BatchNorm that follows a Conv/Gemm into its float weight, which
    # the int8 initializers below would then silently replace (the BatchNorm lost). ONNX Runtime optimizes on load.
    hosts = tensor_quantizers(form)
    copies = [form.get_submodule(n).register_forward_hook(_own_output, prepend=True) for n in hosts]
    try:
        program = torch.onnx.export(
            form, (example_input,), dynamo=True, dynamic_shapes=({0: batch},), optimize=False, verbose=False
        )
    finally:
        for handle in copies:
            handle.remove()
    assert program is not None  # dynamo=True always returns the program
    proto = program.model_proto
    _insert_tensor_qdq(proto, hosts)  # first: it reads the exporter's module scopes of every node
    _insert_qdq(proto, info)
    _insert_lookups(proto, tables)
    _fold_constant_casts(proto)
    for node in proto.graph.node:  # exporter provenance (stack traces, FX names): not needed to run the model
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.checker.check_model(proto)
    path = Path(path)
    last = list(info.values())[-1].output if info else None  # integer requantization may round a tie on its grid
    _verify(proto, model, example_input, path, 2 * last[0] if last is not None else 0.0)  # one step either way
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


@accepts_compiled()
def export_float_onnx(model: nn.Module, path: str | os.PathLike, example_input: Tensor, atol: float = 1e-4) -> Path:
    """Write a float model (dense or pruned, no quantizers) as ONNX — after checking in ONNX Runtime that the file
    computes what the model computes on ``example_input``: largest absolute output difference at most ``atol``
    times the largest output magnitude (at least 1). Used by the app to measure latency of models without QAT.

    Raises:
        TypeError: ``example_input`` is not a tensor.
        ExportMismatchError: ONNX Runtime's outputs differ; nothing is written.
    """
    if not isinstance(example_input, Tensor):
        raise TypeError(
            f"export_float_onnx: `example_input` must be a torch.Tensor, got {type(example_input).__name__}."
        )
    example_input = example_input.detach().to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        program = torch.onnx.export(
            model, (example_input,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            verbose=False,
        )  # fmt: skip
    finally:
        model.train(was_training)
    assert program is not None
    ref, out = _side_by_side(program.model_proto, model, example_input)
    diff = float((out.float() - ref).abs().max())
    if diff > atol * max(1.0, float(ref.abs().max())):
        raise ExportMismatchError(
            f"export_float_onnx: ONNX Runtime's outputs differ from the model's by up to {diff:.3g} on the example "
            f"input, so nothing was written to {path}."
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    return path


def _side_by_side(proto: Any, model: nn.Module, example_input: Tensor) -> tuple[Tensor, Tensor]:
    """The model's outputs (evaluation mode, no gradients) and ONNX Runtime's for the ONNX model ``proto``, on
    ``example_input``, both float32 on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(example_input).float().cpu()
    finally:
        model.train(was_training)
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: example_input.cpu().numpy()})[0])
    return ref, out.float()


def _verify(proto: Any, model: nn.Module, example_input: Tensor, path: Path, grid: float = 0.0) -> None:
    """Run the ONNX model in ONNX Runtime on ``example_input`` next to ``model``; raise when they disagree. ``grid``:
    how far apart two logits may be and still swap places by rounding alone (the output's quantization steps)."""
    ref, out = (t.reshape(len(example_input), -1) for t in _side_by_side(proto, model, example_input))
    top_ref, top_out = ref.argmax(-1), out.argmax(-1)
    # A flip between two logits closer than numerical noise (or than the output grid's rounding) is not a disagreement
    # of the models.
    noise = max(1e-4 * float(ref.abs().max().clamp_min(1e-6)), grid)
    margin = ref.gather(-1, top_ref[:, None]) - ref.gather(-1, top_out[:, None])
    real = int(((top_ref != top_out) & (margin.squeeze(-1) > noise)).sum())
    if 1 - real / len(ref) < PARITY_GOAL:
        raise ExportMismatchError(
            f"export_onnx: ONNX Runtime would disagree with the model on {real} of {len(ref)} example inputs (top-1; "
            f"largest logit difference {float((ref - out).abs().max()):.4g}), so nothing was written to {path}. This "
            "is a combination of options the export does not reproduce: please report it with your "
            "QuantizationAwareTraining / QATConfig settings."
        )


def _dequantize(
    name: str, ints: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int = 0
) -> tuple[list[Any], Any]:
    """Initializers ``<name>_quantized/_scale/_zero_point`` and the DequantizeLinear reading them: per channel (on
    ``axis``) when there is a scale per channel, per tensor (scalar scale and zero-point) when there is one."""
    from onnx import helper, numpy_helper

    per_tensor = scale.size == 1
    if per_tensor:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    inits = [
        numpy_helper.from_array(ints, f"{name}_quantized"),
        numpy_helper.from_array(scale, f"{name}_scale"),
        numpy_helper.from_array(zero_point, f"{name}_zero_point"),
    ]
    attributes: dict[str, Any] = {} if per_tensor else {"axis": axis}
    node = helper.make_node(
        "DequantizeLinear",
        [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
        [f"{name}_dequantized"],
        name=f"{name}/DequantizeLinear",
        **attributes,
    )
    return inits, node


def _quantize_dequantize(source: str, name: str, scale: float, zero_point: int, spec: Any) -> tuple[list, list, str]:
    """``[Clip] -> QuantizeLinear -> DequantizeLinear`` of a per-tensor activation; returns the initializers, the
    nodes and the name of the dequantized output. Below 8 bits the Clip bounds the values to the spec's grid
    (QuantizeLinear itself saturates at the 8-bit range)."""
    from onnx import helper, numpy_helper

    dtype = np.int8 if spec.symmetric else np.uint8
    inits = [
        numpy_helper.from_array(np.array(scale, np.float32), f"{name}_scale"),
        numpy_helper.from_array(np.array(zero_point, dtype), f"{name}_zero_point"),
    ]
    nodes = []
    if spec.bits < 8:
        lo, hi = (spec.qmin - zero_point) * scale, (spec.qmax - zero_point) * scale
        inits += [
            numpy_helper.from_array(np.array(lo, np.float32), f"{name}_clip_min"),
            numpy_helper.from_array(np.array(hi, np.float32), f"{name}_clip_max"),
        ]
        nodes.append(
            helper.make_node("Clip", [source, f"{name}_clip_min", f"{name}_clip_max"], [f"{name}_clipped"],
                             name=f"{name}/Clip")
        )  # fmt: skip
        source = f"{name}_clipped"
    nodes += [
        helper.make_node("QuantizeLinear", [source, f"{name}_scale", f"{name}_zero_point"], [f"{name}_quantized"],
                         name=f"{name}/QuantizeLinear"),
        helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                         [f"{name}_dequantized"], name=f"{name}/DequantizeLinear"),
    ]  # fmt: skip
    return inits, nodes, f"{name}_dequantized"


def _find_layers(graph: Any, info: Mapping[str, QuantizedLayerExport]) -> dict[str, dict[str, Any]]:
    """Where each quantized layer sits in the exported graph: the node that reads its weight, the node (and input
    slot) that adds its bias, the node whose output is the layer's output, and nodes that become unused.

    Two patterns: ``Conv`` / ``Gemm`` reading ``<layer>.weight`` (and ``<layer>.bias``) directly; and a Linear applied
    to inputs of more than two dimensions, which the exporter writes as ``Transpose(<layer>.weight)`` → ``MatMul`` →
    ``Add(<layer>.bias)``.
    """
    from onnx import helper

    by_weight = {f"{name}.weight": name for name in info}
    producers = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    found: dict[str, dict[str, Any]] = {}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 1 and node.input[1] in by_weight:
            layer = by_weight[node.input[1]]
            if node.op_type == "Gemm":
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) != 0:
                    raise ValueError(f"export_onnx: unexpected Gemm layout for layer {layer!r}.")
            bias = (node, 2) if len(node.input) > 2 and node.input[2] else None
            found[layer] = {"node": node, "transposed": False, "bias": bias, "out": node, "drop": []}
        elif node.op_type == "MatMul" and node.input[1] in producers:
            transpose = producers[node.input[1]]
            if transpose.op_type != "Transpose" or transpose.input[0] not in by_weight:
                continue
            layer = by_weight[transpose.input[0]]
            adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
            bias_add = next((a for a in adds if f"{layer}.bias" in a.input), None)
            bias = None if bias_add is None else (bias_add, list(bias_add.input).index(f"{layer}.bias"))
            drop = [transpose] if len(consumers.get(transpose.output[0], [])) == 1 else []
            out = node if bias_add is None else bias_add
            found[layer] = {"node": node, "transposed": True, "bias": bias, "out": out, "drop": drop}
    return found


def _insert_qdq(proto: Any, info: Mapping[str, QuantizedLayerExport]) -> None:
    from onnx import numpy_helper

    graph = proto.graph
    places = _find_layers(graph, info)
    missing = set(info) - set(places)
    if missing:
        raise ValueError(
            f"export_onnx: could not find the exported Conv/Gemm/MatMul of layers {sorted(missing)} (their weight is "
            "used in a way the export does not recognise); leave them out of quantization with `exclude`."
        )
    before: dict[int, list[Any]] = {}
    after: dict[int, list[Any]] = {}
    dropped: set[int] = set()
    shapes: dict[str, list[Any]] = {}  # initializer → the Shape nodes that read it
    for reader in graph.node:
        if reader.op_type == "Shape" and reader.input:
            shapes.setdefault(reader.input[0], []).append(reader)
    for layer, place in places.items():
        data, prefix, node = info[layer], layer, place["node"]
        added: list[Any] = []
        # weight: int8 initializer -> DequantizeLinear (a MatMul reads it transposed: [in, out], channels on axis 1)
        w_scale = data.weight_scale.numpy().astype(np.float32)
        ints = data.weight_int.numpy()
        if place["transposed"]:
            ints = np.ascontiguousarray(ints.T)
            dropped.update(id(n) for n in place["drop"])
        added_inits, dq = _dequantize(
            f"{prefix}.weight", ints, w_scale, data.weight_zero_point.numpy(), axis=1 if place["transposed"] else 0
        )
        added.append(dq)
        node.input[1] = dq.output[0]
        if not place["transposed"]:  # a Shape of the float weight (DenseNet's concatenations): the int8 one's is equal
            for reader in shapes.get(f"{layer}.weight", []):
                reader.input[0] = f"{prefix}.weight_quantized"
        a_spec, a_scale, a_zp = data.input_spec, data.input_scale, data.input_zero_point
        if a_spec.bits == 1:  # binary activation: GreaterOrEqual -> Where (no integer grid; the bias stays float)
            assert data.input_range is not None
            lo, hi = data.input_range
            added_inits += [
                numpy_helper.from_array(np.array((lo + hi) / 2, np.float32), f"{prefix}.input_threshold"),
                numpy_helper.from_array(np.array(lo, np.float32), f"{prefix}.input_low"),
                numpy_helper.from_array(np.array(hi, np.float32), f"{prefix}.input_high"),
            ]
            from onnx import helper

            added += [
                helper.make_node("GreaterOrEqual", [node.input[0], f"{prefix}.input_threshold"],
                                 [f"{prefix}.input_above"], name=f"{prefix}/input/GreaterOrEqual"),
                helper.make_node("Where", [f"{prefix}.input_above", f"{prefix}.input_high", f"{prefix}.input_low"],
                                 [f"{prefix}.input_binarized"], name=f"{prefix}/input/Where"),
            ]  # fmt: skip
            node.input[0] = f"{prefix}.input_binarized"
            graph.initializer.extend(added_inits)
            before[id(node)] = added
            continue
        # activation: [Clip] -> QuantizeLinear -> DequantizeLinear (a shared input already comes out of one)
        if not data.input_shared:
            inits, nodes, node.input[0] = _quantize_dequantize(node.input[0], f"{prefix}.input", a_scale, a_zp, a_spec)
            added_inits += inits
            added += nodes
        # bias: int32 on the grid input_scale x weight_scale -> DequantizeLinear
        if place["bias"] is not None and data.bias is not None:
            bias_node, slot = place["bias"]
            b_scale = (a_scale * w_scale).astype(np.float32)
            # Clamped to the int32 grid as the fake-quantized model clamps it (never a wrapped-around cast).
            b_grid = QuantSpec(32, symmetric=True)
            b_int = np.clip(np.round(data.bias.numpy() / b_scale).astype(np.float64), b_grid.qmin, b_grid.qmax)
            b_int = b_int.astype(np.int32)
            bias_inits, dq = _dequantize(f"{prefix}.bias", b_int, b_scale, np.zeros(b_scale.shape, np.int32))
            added_inits += bias_inits
            added.append(dq)
            bias_node.input[slot] = dq.output[0]
        if data.output is not None:  # the layer's output on its own grid: Conv -> Q -> DQ -> consumers
            inits, after[id(place["out"])] = _quantize_output(place["out"], 0, f"{prefix}.output", *data.output)
            added_inits += inits
        graph.initializer.extend(added_inits)
        before[id(node)] = added
    _splice(graph, graph.node, before, after, dropped)
    # The float weights and biases are no longer read. (Removed only now: the exporter may share one initializer
    # between layers whose values are equal, e.g. two all-zero folded biases.)
    _drop_unused_initializers(graph)


def _drop_unused_initializers(graph: Any) -> None:
    """Remove the initializers no node and no graph output reads (the float weights a rewrite replaced)."""
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _lookup(name: str, ids: str, out: str, at: str, per_row: bool, affine: bool) -> list[Any]:
    """The nodes that look up rows ``ids`` of quantized table ``name`` into ``out``: ``Gather`` of the integers →
    ``Cast`` → [``Sub`` of the rows' zero-points] → ``Mul`` by the rows' scales (see :func:`_insert_lookups`)."""
    from onnx import TensorProto, helper

    nodes: list[Any] = []

    def op(kind: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(kind, inputs, [output], name=f"{at}/{output.rpartition('/')[2]}", **attrs))
        return output

    def per_row_value(table: str, what: str) -> str:  # the looked-up rows' scales (zero-points), as a column
        if not per_row:
            return table
        return op("Unsqueeze", [op("Gather", [table, ids], f"{at}/{what}"), f"{name}.last_axis"], f"{at}/{what}_col")

    rows = op("Cast", [op("Gather", [f"{name}.weight_quantized", ids], f"{at}/ints")], f"{at}/rows",
              to=TensorProto.FLOAT)  # fmt: skip
    if affine:
        rows = op("Sub", [rows, per_row_value(f"{name}.weight_zero_point", "zero")], f"{at}/centred")
    op("Mul", [rows, per_row_value(f"{name}.weight_scale", "scale")], out)
    return nodes


def _insert_lookups(proto: Any, tables: Mapping[str, QuantizedTableExport]) -> None:
    """Every ``Gather`` of a quantized embedding's table reads its integer rows instead: ``Gather`` (int8 table) →
    ``Cast`` → ``Mul`` by the rows' scales (``Gather`` of the scales; ``Sub`` of the zero-points first for an affine
    table). Only the looked-up rows are dequantized — the same values as ``DequantizeLinear`` of the whole table,
    without dequantizing it on every run (ONNX Runtime does not fold a ``DequantizeLinear``)."""
    from onnx import numpy_helper

    graph = proto.graph
    nodes = list(graph.node)  # held, so that id() names each node for the whole rewrite
    inits = {i.name: i for i in graph.initializer}
    reads: dict[str, list[Any]] = {}
    for node in nodes:
        if node.op_type == "Gather" and node.input[0] in inits:
            reads.setdefault(node.input[0], []).append(node)
    before: dict[int, list[Any]] = {}
    for name, data in tables.items():
        ints = data.weight_int.numpy()
        matches = [k for k in reads if inits[k].dims == list(ints.shape) and k.endswith(".weight")]
        mine = f"{name}.weight" if f"{name}.weight" in reads else None
        source = mine or next(
            (k for k in matches if np.array_equal(numpy_helper.to_array(inits[k]), _dequantized(data).numpy())), None
        )
        if source is None:
            raise ValueError(
                f"export_onnx: could not find the Gather that looks up embedding {name!r}; leave it out of "
                "quantization with `exclude`."
            )
        per_row = data.weight_scale.numel() > 1
        added = [numpy_helper.from_array(ints, f"{name}.weight_quantized"),
                 numpy_helper.from_array(data.weight_scale.numpy().astype(np.float32).reshape(-1 if per_row else ()),
                                         f"{name}.weight_scale")]  # fmt: skip
        affine = not data.weight_spec.symmetric
        if affine:
            zero = data.weight_zero_point.numpy().astype(np.float32).reshape(-1 if per_row else ())
            added.append(numpy_helper.from_array(zero, f"{name}.weight_zero_point"))
        graph.initializer.extend(added)
        for k, node in enumerate(reads.pop(source)):
            before[id(node)] = _lookup(name, node.input[1], node.output[0], f"{name}/lookup{k}", per_row, affine)
        if per_row:
            graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{name}.last_axis"))
    _splice(graph, nodes, before, {}, dropped=set(before))  # each float Gather replaced by its integer lookup
    _drop_unused_initializers(graph)


def _fold_constant_casts(proto: Any) -> None:
    """Replace each ``CastLike`` of a constant (the exporter writes a ReLU6's bounds so) by an initializer of the target
    type: ONNX Runtime cannot fold ``CastLike`` itself, and a ``Clip`` whose bounds are not constants is never dropped
    after a ``QuantizeLinear``, which keeps the conv before it in float."""
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1:
            value = helper.get_attribute_value(node.attribute[0])
            if node.attribute[0].name == "value":
                constants[node.output[0]] = numpy_helper.to_array(value)
            elif node.attribute[0].name in ("value_float", "value_int", "value_floats", "value_ints"):
                constants[node.output[0]] = np.asarray(value)
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    types.update({i.name: i.data_type for i in graph.initializer})
    clip_bounds = {name for n in graph.node if n.op_type == "Clip" for name in n.input[1:]}
    folded = []
    for node in graph.node:
        if node.op_type != "CastLike" or node.input[0] not in constants:
            continue
        # the like-tensor's type where recorded; a Clip's bound otherwise takes the float32 of the export form
        elem_type = types.get(node.input[1]) or (onnx.TensorProto.FLOAT if node.output[0] in clip_bounds else None)
        if elem_type is None:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(elem_type)
        graph.initializer.append(numpy_helper.from_array(constants[node.input[0]].astype(dtype), node.output[0]))
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)


def _scopes(node: Any) -> list[str]:
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return list(ast.literal_eval(prop.value))
    return []


def _own_output(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
    """A forward hook for the export on each tensor-quantizer host: a module that is the identity in evaluation
    (StochasticDepth, DropPath, Dropout return their input itself) would have no node of its own in the exported
    graph to put its QuantizeLinear → DequantizeLinear after, so it returns a copy (ONNX ``Identity``, which ONNX
    Runtime removes when it optimizes); any other module's output is left as it is."""
    return out.clone() if args and args[0] is out else None


def _insert_tensor_qdq(proto: Any, tensors: Mapping[str, TensorQParams]) -> None:
    """``QuantizeLinear`` → ``DequantizeLinear`` on the output of each module named in ``tensors`` (its quantizer's
    parameters), found by the exporter's module scopes: the one tensor that nodes inside the module make and nodes
    outside it read. Every reader then reads the dequantized tensor."""
    if not tensors:
        return
    graph = proto.graph
    nodes = list(graph.node)  # held, so that id() names each node for the whole rewrite
    scopes = {id(n): set(_scopes(n)) for n in nodes}
    outputs = {o.name for o in graph.output}
    after: dict[int, list[Any]] = {}
    for module, quantizer in tensors.items():
        inside = [n for n in nodes if module in scopes[id(n)]]
        read_outside = {name for n in nodes if module not in scopes[id(n)] for name in n.input} | outputs
        leaving = [  # a constant the exporter made once inside the module and shares is no output of it
            (n, slot)
            for n in inside
            if n.op_type != "Constant"
            for slot, out in enumerate(n.output)
            if out in read_outside
        ]
        if len(leaving) != 1:
            raise ValueError(
                f"export_onnx: could not find the output of module {module!r} in the exported graph (found "
                f"{len(leaving)} tensors leaving it: {', '.join(f'{n.op_type} {n.output[i]}' for n, i in leaving)}), "
                "so its quantizer cannot be written. Please report the model."
            )
        producer, slot = leaving[0]
        inits, qdq = _quantize_output(producer, slot, f"{module}.output", *quantizer.qparams, quantizer.spec)
        graph.initializer.extend(inits)
        after.setdefault(id(producer), []).extend(qdq)
    _splice(graph, nodes, {}, after)


def _quantize_output(node: Any, slot: int, name: str, scale: float, zero_point: int, spec: Any) -> tuple[list, list]:
    """``QuantizeLinear`` → ``DequantizeLinear`` on output ``slot`` of ``node``: the node now writes ``<name>_float``
    and the pair's dequantized tensor takes the original name, so every reader reads it. Returns the initializers and
    the two nodes (to be placed right after ``node``)."""
    produced = node.output[slot]
    node.output[slot] = f"{name}_float"
    inits, nodes, _ = _quantize_dequantize(node.output[slot], name, scale, zero_point, spec)
    nodes[-1].output[0] = produced
    return inits, nodes


def _splice(
    graph: Any,
    nodes: Iterable[Any],
    before: Mapping[int, list],
    after: Mapping[int, list],
    dropped: AbstractSet[int] = frozenset(),
) -> None:
    """Replace ``graph``'s nodes by ``nodes`` (by ``id``) with the nodes ``before`` / ``after`` each placed around it,
    leaving out the ``dropped`` ones (a dropped node's ``before`` / ``after`` stay: they may replace it)."""
    spliced = [
        m for n in nodes for m in (*before.get(id(n), []), *(() if id(n) in dropped else (n,)), *after.get(id(n), []))
    ]
    del graph.node[:]
    graph.node.extend(spliced)


@accepts_compiled()
def onnx_parity(
    model: nn.Module, onnx_path: str | os.PathLike, batches: Iterable[Tensor | tuple[Tensor, Tensor] | list[Tensor]]
) -> dict[str, float]:
    """Top-1 agreement and largest logit difference between ONNX Runtime and the fake-quantized model.

    Args:
        model: The fake-quantized model (evaluated in eval mode).
        onnx_path: A file written by :func:`export_onnx`.
        batches: Input batches, or ``(input, label)`` batches such as a held-out data loader yields; with labels
            the accuracies of both are reported too (``accuracy_onnx``, ``accuracy_torch``).

    Returns:
        ``top1_agreement`` (goal: at least :data:`PARITY_GOAL`), ``max_logit_diff``, ``samples`` (predictions: a
        token of a ``(batch, tokens, classes)`` output counts as one) and, with labels, the two accuracies.
    """
    import onnxruntime as ort
    from torchmetrics import MaxMetric

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    agree: Any = None
    acc_onnx: Any = None
    acc_torch: Any = None
    max_diff, samples = MaxMetric(), 0
    try:
        with torch.no_grad():
            for batch in batches:
                x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
                ref = model(x.to(device)).float().cpu()
                out = torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0]).float()
                # one prediction per row: a language model's (batch, tokens, vocabulary) logits count per token
                ref, out = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
                y = None if y is None else y.reshape(-1)
                if agree is None:
                    agree = top1(ref.shape[-1])
                    acc_onnx, acc_torch = top1(ref.shape[-1]), top1(ref.shape[-1])
                agree.update(out, ref.argmax(-1))
                samples += len(ref)
                max_diff.update((ref - out).abs().max())
                if y is not None:
                    acc_onnx.update(out, y.cpu())
                    acc_torch.update(ref, y.cpu())
    finally:
        model.train(was_training)
    if agree is None:
        raise ValueError("onnx_parity: `batches` yielded no batch, so there is nothing to compare; pass held-out data.")
    result: dict[str, float] = {
        "top1_agreement": float(agree.compute()),
        "max_logit_diff": float(max_diff.compute()),
        "samples": samples,
    }
    if acc_onnx is not None and acc_onnx.update_count:
        result.update(accuracy_onnx=float(acc_onnx.compute()), accuracy_torch=float(acc_torch.compute()))
    return result


def pruned_zeros_kept(onnx_path: str | os.PathLike, masks: Mapping[str, Tensor]) -> float:
    """The fraction of pruned weights (``False`` in ``masks``, layer name → mask) that are integer zeros in the int8
    ONNX file of :func:`export_onnx` — 1.0 when pruning survived quantization and export exactly.

    Raises:
        ValueError: A masked layer has no quantized weight in the file (it was not quantized).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: i for i in graph.initializer}
    matmul_inputs = {name for n in graph.node if n.op_type == "MatMul" for name in n.input}
    pruned = kept = 0
    for name, mask in masks.items():
        key = f"{name}.weight_quantized"
        if key not in inits:
            raise ValueError(f"{onnx_path} holds no quantized weight for the pruned layer {name!r} ({key!r}).")
        ints = numpy_helper.to_array(inits[key]).astype(np.int32)
        if f"{name}.weight_dequantized" in matmul_inputs:
            ints = ints.T  # a MatMul's weight, stored [in, out]
        zero_key = f"{name}.weight_zero_point"
        zero_point = numpy_helper.to_array(inits[zero_key]).astype(np.int32) if zero_key in inits else np.zeros(1)
        zero = zero_point.reshape((-1,) + (1,) * (ints.ndim - 1)) if zero_point.size > 1 else zero_point.reshape(())
        off = ~mask.detach().cpu().numpy().astype(bool)
        pruned += int(off.sum())
        kept += int((ints == zero)[off].sum())  # the integer that dequantizes to exactly 0
    return kept / pruned if pruned else 1.0
