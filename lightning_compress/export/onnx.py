"""The real integer model: ONNX with QuantizeLinear/DequantizeLinear, int8 weights, run in ONNX Runtime.

:func:`export_onnx` builds the *export form* of a fake-quantized model — BatchNorms folded into their convs,
every quantized layer holding exactly the dequantized grid values it trained with — exports it with
``torch.onnx.export(dynamo=True)`` and then rewrites the graph around every quantized Conv/Gemm:

* the float weight initializer becomes an **int8 initializer** → ``DequantizeLinear`` (per channel, axis 0),
* the bias becomes an int32 initializer on the grid ``input_scale × weight_scale`` → ``DequantizeLinear``,
* the data input passes ``QuantizeLinear`` → ``DequantizeLinear`` with the layer's activation scale and
  zero-point (uint8 for unsigned activations; a ``Clip`` first when fewer than 8 bits are used).

That is the standard QDQ form ONNX Runtime recognises. :func:`onnx_parity` runs the file in ONNX Runtime next to
the fake-quantized PyTorch model and reports how often their top-1 predictions agree.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_compress.core.metrics import top1
from lightning_compress.core.quantizers import quantize
from lightning_compress.quantization.prepare import detach, folded_weight_and_bias, quantized_layers

PARITY_GOAL = 0.995


def _copy_module(model: nn.Module) -> nn.Module:
    trainer = getattr(model, "_trainer", None)
    memo = {id(trainer): None} if trainer is not None else {}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def export_form(model: nn.Module) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """A float copy of ``model`` that computes what the integer model computes, and each layer's integers.

    Returns the copy (BatchNorms that were folded replaced by ``nn.Identity``, quantizers removed, each quantized
    layer's weight set to its dequantized grid values and its bias to the folded bias) and, per layer name, the
    int weights, their scales, the folded bias and the activation quantization parameters.
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(
            "export_onnx: the model has no quantized layers. Train it with QuantizationAwareTraining first."
        )
    not_ready = [n for n, m in layers.items() if not (m.input_quantizer.initialized and m.weight_quantizer.initialized)]
    if not_ready:
        raise ValueError(
            f"export_onnx: no quantized training step has run yet (layers {not_ready[:3]} have observed no range). "
            "Export after QuantizationAwareTraining's start_epoch and calibration steps."
        )
    was_training = model.training
    model.eval()
    info: dict[str, dict[str, Any]] = {}
    bn_names = {}
    module_names = {id(m): n for n, m in model.named_modules()}
    for name, layer in layers.items():
        weight, bias = folded_weight_and_bias(layer)
        wq = layer.weight_quantizer
        if wq.observing:
            wq.observe(weight)  # weights' ranges are a function of the current weights
        w_scale, w_zp = wq.qparams()
        ints = quantize(weight, w_scale, w_zp, wq.spec)
        a_scale, a_zp = layer.input_quantizer.qparams()
        info[name] = {
            "weight_int": ints.to(torch.int8),
            "weight_scale": w_scale.clone(),
            "weight_zero_point": w_zp.to(torch.int8).clone(),
            "bias": None if bias is None else bias.detach().float().clone(),
            "input_scale": float(a_scale.reshape(-1)[0]),
            "input_zero_point": int(a_zp.reshape(-1)[0]),
            "input_spec": layer.input_quantizer.spec,
            "input_range": layer.input_quantizer.fixed_range,
            "output": _output_qparams(layer),
            "weight_spec": wq.spec,
        }
        if layer._qat_bn is not None:
            bn_names[name] = module_names[id(layer._qat_bn)]
    model.train(was_training)

    form = _copy_module(model).eval()
    modules = dict(form.named_modules())
    for name, data in info.items():
        layer = modules[name]
        detach(layer)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.data = (data["weight_int"].float() * data["weight_scale"].reshape(shape)).to(layer.weight.dtype)
        if data["bias"] is not None:
            layer.bias = nn.Parameter(data["bias"].to(layer.weight.dtype))
        if name in bn_names:
            parent_name, _, child = bn_names[name].rpartition(".")
            setattr(modules[parent_name] if parent_name else form, child, nn.Identity())
    return form, info


def _output_qparams(layer: Any) -> tuple[float, int, Any] | None:
    quantizer = getattr(layer, "output_quantizer", None)
    if quantizer is None or not quantizer.initialized:
        return None
    scale, zero_point = quantizer.qparams()
    return float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0]), quantizer.spec


def _check_input(form: nn.Module, example_input: Tensor) -> None:
    if not isinstance(example_input, Tensor):
        raise TypeError(f"export_onnx: `example_input` must be a tensor, got {type(example_input).__name__}.")
    try:
        with torch.no_grad():
            form(example_input)
    except Exception as err:  # noqa: BLE001 - reported in one line, not as an exporter stack trace
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"export_onnx: `example_input` of shape {tuple(example_input.shape)} does not fit the model ({first})."
        ) from None


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: Tensor) -> Path:
    """Write the QAT model as ONNX with QuantizeLinear/DequantizeLinear and int8 weight initializers.

    Args:
        model: The LightningModule or ``nn.Module`` after quantization-aware training.
        path: Where to write the ``.onnx`` file.
        example_input: One input batch (its first dimension is exported as dynamic).

    Raises:
        ValueError: No quantized step has run yet, or ``example_input`` does not fit the model (one line each).
    """
    import onnx

    form, info = export_form(model)
    example_input = example_input.detach().to(next(form.parameters()).device)
    _check_input(form, example_input)
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        form, (example_input,), dynamo=True, dynamic_shapes=({0: batch},), optimize=True, verbose=False
    )
    assert program is not None  # dynamo=True always returns the program
    proto = program.model_proto
    _insert_qdq(proto, info)
    for node in proto.graph.node:  # exporter provenance (stack traces, FX names): not needed to run the model
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.checker.check_model(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def _dequantize(name: str, ints: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> tuple[list[Any], Any]:
    """Initializers ``<name>_quantized/_scale/_zero_point`` and the per-channel DequantizeLinear reading them."""
    from onnx import helper, numpy_helper

    inits = [
        numpy_helper.from_array(ints, f"{name}_quantized"),
        numpy_helper.from_array(scale, f"{name}_scale"),
        numpy_helper.from_array(zero_point, f"{name}_zero_point"),
    ]
    node = helper.make_node(
        "DequantizeLinear",
        [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
        [f"{name}_dequantized"],
        axis=0,
        name=f"{name}/DequantizeLinear",
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


def _insert_qdq(proto: Any, info: dict[str, dict[str, Any]]) -> None:
    from onnx import helper, numpy_helper

    graph = proto.graph
    by_weight = {f"{name}.weight": name for name in info}
    new_nodes, done = [], set()
    for node in graph.node:
        layer = by_weight.get(node.input[1]) if node.op_type in ("Conv", "Gemm") and len(node.input) > 1 else None
        if layer is None:
            new_nodes.append(node)
            continue
        data, prefix = info[layer], layer
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) != 0:
                raise ValueError(f"export_onnx: unexpected Gemm layout for layer {layer!r}.")
        added = []
        # weight: int8 initializer -> DequantizeLinear
        w_scale = data["weight_scale"].numpy().astype(np.float32)
        added_inits, dq = _dequantize(
            f"{prefix}.weight", data["weight_int"].numpy(), w_scale, data["weight_zero_point"].numpy()
        )
        added.append(dq)
        node.input[1] = dq.output[0]
        a_spec, a_scale, a_zp = data["input_spec"], data["input_scale"], data["input_zero_point"]
        if a_spec.bits == 1:  # binary activation: GreaterOrEqual -> Where (no integer grid; the bias stays float)
            lo, hi = data["input_range"]
            added_inits += [
                numpy_helper.from_array(np.array((lo + hi) / 2, np.float32), f"{prefix}.input_threshold"),
                numpy_helper.from_array(np.array(lo, np.float32), f"{prefix}.input_low"),
                numpy_helper.from_array(np.array(hi, np.float32), f"{prefix}.input_high"),
            ]
            added += [
                helper.make_node("GreaterOrEqual", [node.input[0], f"{prefix}.input_threshold"],
                                 [f"{prefix}.input_above"], name=f"{prefix}/input/GreaterOrEqual"),
                helper.make_node("Where", [f"{prefix}.input_above", f"{prefix}.input_high", f"{prefix}.input_low"],
                                 [f"{prefix}.input_binarized"], name=f"{prefix}/input/Where"),
            ]  # fmt: skip
            node.input[0] = f"{prefix}.input_binarized"
            graph.initializer.extend(added_inits)
            new_nodes += [*added, node]
            done.add(layer)
            continue
        # activation: [Clip] -> QuantizeLinear -> DequantizeLinear
        inits, nodes, node.input[0] = _quantize_dequantize(node.input[0], f"{prefix}.input", a_scale, a_zp, a_spec)
        added_inits += inits
        added += nodes
        # bias: int32 on the grid input_scale x weight_scale -> DequantizeLinear
        if len(node.input) > 2 and node.input[2] and data["bias"] is not None:
            b_scale = (a_scale * w_scale).astype(np.float32)
            b_int = np.round(data["bias"].numpy() / b_scale).astype(np.int32)
            bias_inits, dq = _dequantize(f"{prefix}.bias", b_int, b_scale, np.zeros_like(b_int))
            added_inits += bias_inits
            added.append(dq)
            node.input[2] = dq.output[0]
        after: list[Any] = []
        if data.get("output") is not None:  # the layer's output on its own grid: Conv -> Q -> DQ -> consumers
            o_scale, o_zp, o_spec = data["output"]
            produced = node.output[0]
            node.output[0] = f"{prefix}.output_float"
            inits, after, result = _quantize_dequantize(node.output[0], f"{prefix}.output", o_scale, o_zp, o_spec)
            added_inits += inits
            after[-1].output[0] = produced
        graph.initializer.extend(added_inits)
        new_nodes += [*added, node, *after]
        done.add(layer)
    missing = set(info) - done
    if missing:
        raise ValueError(f"export_onnx: could not find the exported Conv/Gemm of layers {sorted(missing)}.")
    del graph.node[:]
    graph.node.extend(new_nodes)
    # The float weights and biases are no longer read. (Removed only now: the exporter may share one initializer
    # between layers whose values are equal, e.g. two all-zero folded biases.)
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


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
        ``top1_agreement`` (goal: at least :data:`PARITY_GOAL`), ``max_logit_diff``, ``samples`` and, with labels,
        the two accuracies.
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

    inits = {i.name: i for i in onnx.load(str(onnx_path)).graph.initializer}
    pruned = kept = 0
    for name, mask in masks.items():
        key = f"{name}.weight_quantized"
        if key not in inits:
            raise ValueError(f"{onnx_path} holds no quantized weight for the pruned layer {name!r} ({key!r}).")
        ints = numpy_helper.to_array(inits[key])
        off = ~mask.detach().cpu().numpy().astype(bool)
        pruned += int(off.sum())
        kept += int((ints[off] == 0).sum())
    return kept / pruned if pruned else 1.0
