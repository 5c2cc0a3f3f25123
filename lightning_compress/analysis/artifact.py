"""The compact artifact (``model.lcz``): a model's tensors in the fewest bytes, and back into the model.

Two forms:

* **model** (the default of :func:`save_compressed`): the model's own ``state_dict`` — quantizers included, so that
  :func:`load_compressed` ``(path, model)`` restores it into a model built the same way (plain, pruned, clustered,
  low-rank, or prepared with the same :class:`~lightning_compress.QATConfig`) and the restored model computes exactly
  what the saved one computed. A quantized layer's weight is stored as the integers its quantizer produces (of the
  BatchNorm-folded weight, when a BatchNorm is folded) with their scales and zero-points (affine weights included),
  and turned back into the float weight on loading (the folding undone with the loaded BatchNorm).
* **deploy** (``deploy=True``): the smallest file, for serving; tensors only. A quantized model is stored as its
  integer model (``export_form``: BatchNorms folded, weights as integers with ``weight_scale`` and, for affine weights,
  ``weight_zero_point`` (symmetric ones have zero-points 0),
  ``input_scale`` / ``input_zero_point`` and ``output_scale`` / ``output_zero_point`` per layer, and the residual
  additions' ``output_quantizer.scale`` / ``.zero_point``). In a float model every Conv → BatchNorm pair is folded:
  into the convolution's weight and bias (``w·f``, ``β + (b − μ)·f`` with ``f = γ/√(σ² + ε)``) — or, where the
  convolution's weight is stored as a codebook (weight clustering: folding would give every output channel its own
  values), into two vectors ``<bn>.scale`` = ``f`` and ``<bn>.shift`` = ``β + (b − μ)·f`` (the BatchNorm computes
  ``y·scale + shift``; the convolution's bias is then dropped).

Byte layout (version 2; every integer little-endian)::

    b"LCZ2"                       magic and format version
    uint32 H                      length of the JSON header
    lzma(header ‖ payload)        xz container, preset 9 extreme

The header is a JSON object ``{"version": 2, "form": "model" | "deploy", "tensors": [...], ...}`` with one entry per
tensor: ``name``, ``shape``, ``dtype`` (NumPy's name), ``offset`` into the payload and the ``sizes`` of its parts.
``kind="sparse"``: a bitmask of the non-zeros (``numpy.packbits`` order, ``ceil(n/8)`` bytes), then the non-zero
values in row-major order. ``kind="codebook"`` (the non-zeros share at most 256 values and that is smaller): the
bitmask, the sorted distinct non-zero values, then each non-zero's index into them at ``bits`` = ``⌈log2 k⌉`` bits,
most significant bit first. In the model form an entry may carry ``"dequantize": {"scale": ..., "zero_point": ...,
"unfold_bn": ...}``: the tensor holds integers ``q`` of a quantized weight, the float weight is ``(q − zero_point) ·
scale`` per output channel (the two named tensors of the file, ``<layer>.weight@scale`` / ``@zero_point``), divided by
the named BatchNorm's factor ``γ/√(σ² + ε)`` when one was folded into it. Version 1 files (``LCZ1``: a JSON list of
entries, no forms) are read as tensors.
"""

from __future__ import annotations

import json
import lzma
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor, nn

from lightning_compress.core.clustering import index_bits
from lightning_compress.core.compiled import accepts_compiled
from lightning_compress.core.layout import TRANSPOSED, weight_layout
from lightning_compress.core.quantizers import FakeQuantizer
from lightning_compress.export.onnx import export_form
from lightning_compress.quantization.prepare import (
    bn_factor,
    find_conv_bn_pairs,
    quantized_embeddings,
    quantized_layers,
    weight_integers,
)

VERSION = 2
_MAGIC = b"LCZ"
#: A tensor whose non-zeros share at most this many values is stored as a codebook plus indices (when smaller).
CODEBOOK_MAX = 256
#: The suffixes of the scale and zero-point stored beside a quantized weight's integers in the model form.
SCALE, ZERO_POINT = "@scale", "@zero_point"


def _state_dict(obj: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    sd = obj.state_dict() if isinstance(obj, nn.Module) else dict(obj)
    return {k: v.detach().cpu() for k, v in sd.items() if isinstance(v, Tensor)}


def fp32_size_bytes(obj: nn.Module | Mapping[str, Tensor]) -> int:
    """Bytes of the state dict stored densely with every floating-point tensor in float32."""
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in _state_dict(obj).values())


# --------------------------------------------------------------------------- what is stored
def model_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """The model form: ``model``'s own state dict, each quantized layer's weight as its integers (with
    ``<layer>.weight@scale`` / ``@zero_point`` beside them), and per such weight how to turn it back into floats. A
    weight tied to another module (GPT-2's ``lm_head`` and token embedding) stays in float: the other reads it so."""
    names = {id(m): n for n, m in model.named_modules()}
    keys_of: dict[int, int] = {}
    for value in model.state_dict(keep_vars=True).values():
        keys_of[id(value)] = keys_of.get(id(value), 0) + 1
    integers = {
        name: weight_integers(layer)  # first: an observing weight quantizer reads the current weight, as a forward
        for name, layer in {**quantized_layers(model), **quantized_embeddings(model)}.items()
        if layer.weight_quantizer.quantizing
        and layer.weight_quantizer.initialized  # else the weight is used in float
        and keys_of.get(id(layer.weight), 1) == 1
    }
    state = _state_dict(model)
    how: dict[str, dict[str, Any]] = {}
    for name, (ints, scale, zero_point) in integers.items():
        key = f"{name}.weight"
        layer = model.get_submodule(name)
        transposed = weight_layout(layer) == TRANSPOSED  # stored as the layer stores it: (in, out), a scale per column
        state[key] = (ints.t() if transposed else ints).cpu()
        state[key + SCALE], state[key + ZERO_POINT] = scale.detach().cpu().float(), zero_point.detach().cpu()
        bn: Any = getattr(layer, "_qat_bn", None)
        how[key] = {"scale": key + SCALE, "zero_point": key + ZERO_POINT, "unfold_bn": names[id(bn)] if bn else None}
        if transposed:
            how[key]["axis"] = 1
    return state, how


def deploy_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The deploy form (see the module's docstring): the integer model of a quantized model, or a float model with
    every Conv → BatchNorm pair folded."""
    if quantized_layers(model) or quantized_embeddings(model):
        form, info, tables = export_form(model)
        state = _state_dict(form)
        for name, data in info.items():
            state[f"{name}.weight"] = data.weight_int
            state[f"{name}.weight_scale"] = data.weight_scale
            if not data.weight_spec.symmetric:  # symmetric weights' zero-points are 0
                state[f"{name}.weight_zero_point"] = data.weight_zero_point
            state[f"{name}.input_scale"] = torch.tensor(data.input_scale)
            state[f"{name}.input_zero_point"] = torch.tensor(data.input_zero_point, dtype=torch.int32)
            if data.output is not None:
                state[f"{name}.output_scale"] = torch.tensor(data.output[0])
                state[f"{name}.output_zero_point"] = torch.tensor(data.output[1], dtype=torch.int32)
        for name, table in tables.items():  # weight only: the rows' integers and scales
            state[f"{name}.weight"], state[f"{name}.weight_scale"] = table.weight_int, table.weight_scale
            if not table.weight_spec.symmetric:
                state[f"{name}.weight_zero_point"] = table.weight_zero_point
        return state, {"integer_model": sorted(info), "integer_tables": sorted(tables)}
    return _fold_batchnorms(model)


@torch.no_grad()
def _fold_batchnorms(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    state = _state_dict(model)
    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    folded, affine = {}, {}
    for conv_name, bn_name in find_conv_bn_pairs(model, convs).items():
        conv, bn = modules[conv_name], modules[bn_name]
        if not getattr(bn, "track_running_stats", False) or bn.running_var is None:
            continue
        factor = bn_factor(bn).detach().cpu().float()
        bias = conv.bias.detach().cpu().float() if conv.bias is not None else torch.zeros_like(factor)
        beta = bn.bias.detach().cpu().float() if bn.affine else torch.zeros_like(factor)
        shift = beta + (bias - bn.running_mean.detach().cpu().float()) * factor
        for key in [k for k in state if k.startswith(f"{bn_name}.")]:
            del state[key]
        weight = state[f"{conv_name}.weight"]
        values = weight[weight != 0]
        if codebook_pays(int(torch.unique(values).numel()), values.numel()):
            state[f"{bn_name}.scale"], state[f"{bn_name}.shift"] = factor, shift
            state.pop(f"{conv_name}.bias", None)
            affine[bn_name] = conv_name
        else:
            state[f"{conv_name}.weight"] = weight.float() * factor.reshape((-1,) + (1,) * (weight.dim() - 1))
            state[f"{conv_name}.bias"] = shift
            folded[bn_name] = conv_name
    return state, {"folded_batchnorms": folded, "affine_batchnorms": affine}


# --------------------------------------------------------------------------- writing
@accepts_compiled("obj")
def save_compressed(obj: nn.Module | Mapping[str, Tensor], path: str | os.PathLike, *, deploy: bool = False) -> int:
    """Write the compact artifact of a model (or a state dict) and return its size in bytes.

    Every tensor is stored as a packed bitmask of its non-zeros plus the non-zero values (floating point as float32,
    integers in their own type: int8 for quantized weights) or, when its non-zeros share at most 256 values and that
    is smaller, their codebook plus ``⌈log2 k⌉``-bit indices; the payload is compressed with ``lzma``. The bytes are
    read back and compared with what was meant to be stored before the file is written.

    Args:
        obj: A model (stored in the model form, or the deploy form) or a state dict (stored as it is).
        path: The file to write.
        deploy: The smallest file, for serving (BatchNorms folded; tensors only): see the module's docstring. The
            default, the model form, loads back into a model built the same way (:func:`load_compressed`).
    """
    tensors, data = _encoded(obj, deploy)
    back = decode(data, str(path))[0]
    mismatch = next((k for k, t in tensors.items() if not _same(back[k], t)), None)
    if mismatch is not None or set(back) != set(tensors):
        raise RuntimeError(f"save_compressed: tensor {mismatch!r} did not read back as written; nothing was written.")
    Path(path).write_bytes(data)
    return len(data)


@accepts_compiled("obj")
def compressed_size(obj: nn.Module | Mapping[str, Tensor], *, deploy: bool = False) -> int:
    """The bytes :func:`save_compressed` would write, without writing a file."""
    return len(_encoded(obj, deploy)[1])


def _encoded(obj: nn.Module | Mapping[str, Tensor], deploy: bool) -> tuple[dict[str, Tensor], bytes]:
    """The tensors a model (in its model or deploy form) or a state dict is stored as, and the artifact's bytes."""
    how: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {}
    if not isinstance(obj, nn.Module):
        tensors, form = _state_dict(obj), "tensors"
    elif deploy:
        (tensors, extra), form = deploy_state(obj), "deploy"
    else:
        (tensors, how), form = model_state(obj), "model"
        extra = {"quantizing": quantizing_phases(obj)}
    return tensors, encode(tensors, {"form": form, **extra}, how)


def quantizing_phases(model: nn.Module) -> dict[str, bool]:
    """Quantizer name → whether it quantizes (a model saved before quantization started computes in float)."""
    return {n: bool(m.quantizing) for n, m in model.named_modules() if isinstance(m, FakeQuantizer)}


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b.float() if b.is_floating_point() else b)


def encode(tensors: Mapping[str, Tensor], meta: Mapping[str, Any], how: Mapping[str, Any]) -> bytes:
    """The bytes of an artifact holding ``tensors`` (see the module's docstring for the layout)."""
    entries, chunks, offset = [], [], 0
    for name, tensor in tensors.items():
        array = tensor.float().numpy() if tensor.is_floating_point() else tensor.contiguous().numpy()
        values = array.ravel()
        nonzero = values != 0
        kept = values[nonzero].astype(values.dtype.newbyteorder("<"))
        parts = [np.packbits(nonzero).tobytes(), kept.tobytes()]
        entry: dict[str, object] = {"kind": "sparse", "dtype": str(values.dtype)}
        book = _codebook(kept)
        if book is not None:
            parts = [parts[0], *book[1:]]
            entry = {"kind": "codebook", "dtype": str(values.dtype), "bits": book[0]}
        if name in how:
            entry["dequantize"] = how[name]
        sizes = [len(p) for p in parts]
        entries.append({"name": name, "shape": list(tensor.shape), "offset": offset, "sizes": sizes, **entry})
        chunks.extend(parts)
        offset += sum(sizes)
    head = json.dumps({"version": VERSION, **meta, "tensors": entries}).encode()
    body = lzma.compress(head + b"".join(chunks), preset=9 | lzma.PRESET_EXTREME)
    return _MAGIC + str(VERSION).encode() + struct.pack("<I", len(head)) + body


# --------------------------------------------------------------------------- reading
def decode(data: bytes, path: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors of an artifact and its header (without the tensor entries)."""
    if data[:3] != _MAGIC or not data[3:4].isdigit():
        raise ValueError(f"{path} is not a lightning-compress artifact (bad magic {data[:4]!r}).")
    version = int(data[3:4])
    if version > VERSION:
        raise ValueError(
            f"{path} is a lightning-compress artifact of format version {version}, newer than this version reads "
            f"({VERSION}): upgrade lightning-compress to read it."
        )
    try:
        (head_len,) = struct.unpack("<I", data[4:8])
        raw = lzma.decompress(data[8:])
        header, payload = json.loads(raw[:head_len].decode()), raw[head_len:]
    except (struct.error, lzma.LZMAError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is a damaged lightning-compress artifact (truncated or corrupt: {type(err).__name__}: {err}); "
            "write it again with save_compressed."
        ) from None
    if version == 1:  # a bare list of entries, tensors only
        header = {"version": 1, "form": "tensors", "tensors": header}
    out = {entry["name"]: _read(entry, payload) for entry in header["tensors"]}
    return out, header


def _read(entry: Mapping[str, Any], payload: bytes) -> Tensor:
    start = entry["offset"]
    shape = tuple(entry["shape"])
    count = int(np.prod(shape)) if shape else 1
    dtype = np.dtype(entry["dtype"]).newbyteorder("<")
    mask_len, *rest = entry["sizes"]
    mask = np.unpackbits(np.frombuffer(payload, np.uint8, mask_len, start))[:count].astype(bool)
    values = np.zeros(count, dtype.newbyteorder("="))
    if entry.get("kind") == "codebook":
        book_len, index_len = rest
        book = np.frombuffer(payload, dtype, book_len // dtype.itemsize, start + mask_len)
        packed = np.frombuffer(payload, np.uint8, index_len, start + mask_len + book_len)
        values[mask] = book[_unpack_indices(packed, int(mask.sum()), int(entry["bits"]))]
    else:
        (values_len,) = rest
        values[mask] = np.frombuffer(payload, dtype, values_len // dtype.itemsize, start + mask_len)
    return torch.from_numpy(values.reshape(shape))


@overload
def load_compressed(path: str | os.PathLike) -> dict[str, Tensor]: ...


@overload
def load_compressed(path: str | os.PathLike, model: nn.Module) -> nn.Module: ...


@accepts_compiled()
def load_compressed(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, Tensor] | nn.Module:
    """Read a file written by :func:`save_compressed`: its tensors exactly (floating point as float32), or — with
    ``model`` — the model restored from it.

    ``model`` must be built the same way as the saved one: the same class and arguments, prepared with the same
    :class:`~lightning_compress.QATConfig` if the saved one was (:func:`~lightning_compress.prepare_qat`). Its state is
    replaced (quantized weights turned back into floats, BatchNorm folding undone) and its quantizers set to quantize
    with the saved ranges (in the saved phase), not observe: it then computes what the saved model computed, in
    evaluation mode.

    Raises:
        ValueError: Not an artifact, a damaged one, a newer format version; with ``model``: a file in the deploy form or
            a bare state dict, or one of another model (the first tensor that differs named: missing, unexpected, or
            of another shape).
    """
    tensors, header = decode(Path(path).read_bytes(), str(path))
    if model is None:
        return tensors
    if header.get("form") != "model":
        raise ValueError(
            f"load_compressed: {path} holds the {header.get('form')} form (version {header['version']}), which does "
            "not load into a model: "
            + ("its BatchNorms are folded. " if header.get("form") == "deploy" else "it holds tensors only. ")
            + "Save the model with save_compressed(model, path) (the model form) to restore it."
        )
    how = {e["name"]: e["dequantize"] for e in header["tensors"] if "dequantize" in e}
    extras = {k for h in how.values() for k in (h["scale"], h["zero_point"])}
    state = {k: v for k, v in tensors.items() if k not in extras}
    _check_same_model(str(path), model, state)
    expected = model.state_dict()
    unfold: dict[str, str] = {}
    for key, spec in how.items():
        shape = [1] * state[key].dim()
        shape[spec.get("axis", 0)] = -1
        ints = state[key].float() - tensors[spec["zero_point"]].float().reshape(shape)
        state[key] = (ints * tensors[spec["scale"]].reshape(shape)).to(expected[key].dtype)
        if spec["unfold_bn"] is not None:
            unfold[key.rpartition(".")[0]] = spec["unfold_bn"]
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    with torch.no_grad():
        for layer_name, bn_name in unfold.items():
            weight: Any = model.get_submodule(layer_name).weight
            weight.div_(bn_factor(model.get_submodule(bn_name)).reshape((-1,) + (1,) * (weight.dim() - 1)))
    phases = header.get("quantizing", {})
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizer):  # the saved phase, ranges frozen: the saved model's function
            module.observing, module.quantizing = False, bool(phases.get(name, True))
    return model


def _check_same_model(path: str, model: nn.Module, state: Mapping[str, Tensor]) -> None:
    expected = model.state_dict()
    for key, value in state.items():
        if key not in expected:
            hint = (
                " (the saved model was prepared for quantization: prepare this one with the same QATConfig first)"
                if "_quantizer." in key
                else ""
            )
            raise ValueError(
                f"load_compressed: {path} is of another model: it holds {key!r}, which this model has not{hint}."
            )
        if tuple(expected[key].shape) != tuple(value.shape):
            raise ValueError(
                f"load_compressed: {path} is of another model: {key!r} is {tuple(value.shape)} in the file, "
                f"{tuple(expected[key].shape)} in this model."
            )
    missing = next((k for k in expected if k not in state), None)
    if missing is not None:
        raise ValueError(f"load_compressed: {path} is of another model: it has no {missing!r}, which this model has.")


# --------------------------------------------------------------------------- codebooks
def codebook_pays(distinct: int, count: int, itemsize: int = 4) -> bool:
    """Whether ``count`` non-zero values sharing ``distinct`` values are stored as a codebook plus ``⌈log2 k⌉``-bit
    indices: at most :data:`CODEBOOK_MAX` values, and smaller than the values themselves (``itemsize`` bytes each).

    Example:
        >>> codebook_pays(16, 1000), codebook_pays(200, 210), codebook_pays(300, 10_000)
        (True, False, False)
    """
    return (
        0 < distinct <= CODEBOOK_MAX
        and distinct * itemsize + (count * index_bits(distinct) + 7) // 8 < count * itemsize
    )


def _codebook(kept: np.ndarray) -> tuple[int, bytes, bytes] | None:
    """``(bits, codebook, packed indices)`` for non-zero values when :func:`codebook_pays`; else ``None``."""
    book, indices = np.unique(kept, return_inverse=True)
    if not codebook_pays(len(book), len(kept), kept.itemsize):
        return None
    bits = index_bits(len(book))
    # most significant bit first, one index after the other: 4-bit indices are nibbles, 2-bit ones quarter bytes
    planes = (indices.astype(np.uint16)[:, None] >> np.arange(bits - 1, -1, -1, dtype=np.uint16)) & 1
    return bits, book.tobytes(), np.packbits(planes.astype(np.uint8).ravel()).tobytes()


def _unpack_indices(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    planes = np.unpackbits(packed)[: count * bits].reshape(count, bits).astype(np.int64)
    return (planes << np.arange(bits - 1, -1, -1)).sum(axis=1)
