"""Size accounting and the compact artifact: one place that says how big a compressed model is.

* :func:`compression_summary` — per-layer parameters, non-zeros, sparsity and bytes, without a Trainer.
* :func:`save_compressed` / :func:`load_compressed` — a real file: for every tensor a bitmask of its
  non-zeros plus the non-zero values, the whole payload entropy-coded with the standard library's
  ``lzma``. Its size on disk is the ``size_bytes_compressed`` of ``report.json``.
* :func:`model_report` — the numbers of ``report.json`` for a model.
"""

from __future__ import annotations

import json
import lzma
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

_MAGIC = b"LCZ1"


@dataclass(frozen=True)
class LayerStats:
    """One row of :func:`compression_summary`: a module that owns parameters."""

    name: str
    type: str
    params: int
    nonzero: int
    bytes: int
    bits: int = 32
    packed_bytes: int = 0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.params if self.params else 0.0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "sparsity": self.sparsity}


def _weight_bits(module: nn.Module) -> int:
    """Bits of the module's weight: its weight quantizer's under quantization-aware training, else 32."""
    spec = getattr(getattr(module, "weight_quantizer", None), "spec", None)
    return int(spec.bits) if spec is not None else 32


def compression_summary(model: nn.Module) -> list[LayerStats]:
    """Per-layer figures for every module that owns parameters (its own, not its children's).

    ``bytes`` is the in-memory size of those parameters (``numel × element_size``). ``bits`` is the weight's
    bit-width (a quantized layer's weight quantizer; 32 otherwise) and ``packed_bytes`` what the layer takes as the
    compact artifact lays it out before lzma: a bitmask of the non-zeros plus the non-zero weights at ``bits`` and
    the other parameters (bias) at 32 bits.

    Example:
        >>> net = nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight[0].zero_()
        >>> row = compression_summary(net)[0]
        >>> (row.params, row.nonzero, round(row.sparsity, 2))
        (10, 6, 0.4)
    """
    from lightning_compress.quantization.quantizers import FakeQuantizer

    rows = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own or isinstance(module, FakeQuantizer):  # a learned scale is part of its layer's encoding
            continue
        bits = _weight_bits(module)
        weight = getattr(module, "weight", None)
        nonzero = {id(p): int(torch.count_nonzero(p.detach())) for p in own}
        packed = sum(
            math.ceil(p.numel() / 8) + math.ceil(nonzero[id(p)] * (bits if p is weight else 32) / 8) for p in own
        )
        rows.append(
            LayerStats(
                name=name or type(model).__name__,
                type=type(module).__name__,
                params=sum(p.numel() for p in own),
                nonzero=sum(nonzero.values()),
                bytes=sum(p.numel() * p.element_size() for p in own),
                bits=bits,
                packed_bytes=packed,
            )
        )
    return rows


def _state_dict(obj: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    sd = obj.state_dict() if isinstance(obj, nn.Module) else dict(obj)
    return {k: v.detach().cpu() for k, v in sd.items() if isinstance(v, Tensor)}


def _state_dict_without_quantizers(model: nn.Module) -> dict[str, Tensor]:
    # The fp32 reference is the user's model: quantizer buffers (scales, observed ranges) are not part of it.
    return {k: v for k, v in _state_dict(model).items() if "_quantizer." not in k}


def fp32_size_bytes(obj: nn.Module | Mapping[str, Tensor]) -> int:
    """Bytes of the state dict stored densely with every floating-point tensor in float32."""
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in _state_dict(obj).values())


def compressed_state(model: nn.Module) -> dict[str, Tensor]:
    """What the compact artifact stores for ``model``.

    A model without quantized layers: its state dict. A model after quantization-aware training: its export
    form (BatchNorms folded) with every quantized layer's weight as **integers** (``<layer>.weight``, int8) next to
    its scales (``<layer>.weight_scale``) and its input activation's scale and zero-point.
    """
    from lightning_compress.quantization.attach import quantized_layers

    if not quantized_layers(model):
        return _state_dict(model)
    from lightning_compress.quantization.export import export_form

    form, info = export_form(model)
    state = _state_dict(form)
    for name, data in info.items():
        state[f"{name}.weight"] = data["weight_int"]
        state[f"{name}.weight_scale"] = data["weight_scale"]
        state[f"{name}.input_scale"] = torch.tensor(data["input_scale"])
        state[f"{name}.input_zero_point"] = torch.tensor(data["input_zero_point"], dtype=torch.int32)
    return state


def save_compressed(obj: nn.Module | Mapping[str, Tensor], path: str | os.PathLike) -> int:
    """Write the compact artifact of a model (or state dict) and return its size in bytes.

    Every tensor is stored as a packed bitmask of its non-zeros plus the non-zero values (floating point as
    float32, integers in their own type: int8 for quantized weights); the payload is compressed with ``lzma``.
    A model is stored as :func:`compressed_state` gives it (integers for quantized layers). Loading it back with
    :func:`load_compressed` gives those tensors exactly (floating point as float32).
    """
    tensors = compressed_state(obj) if isinstance(obj, nn.Module) else _state_dict(obj)
    header, chunks, offset = [], [], 0
    for name, tensor in tensors.items():
        array = tensor.float().numpy() if tensor.is_floating_point() else tensor.contiguous().numpy()
        values = array.ravel()
        nonzero = values != 0
        parts = [np.packbits(nonzero).tobytes(), values[nonzero].astype(values.dtype.newbyteorder("<")).tobytes()]
        entry = {"kind": "sparse", "dtype": str(values.dtype)}
        sizes = [len(p) for p in parts]
        header.append({"name": name, "shape": list(tensor.shape), "offset": offset, "sizes": sizes, **entry})
        chunks.extend(parts)
        offset += sum(sizes)
    head = json.dumps(header).encode()
    body = lzma.compress(head + b"".join(chunks), preset=9 | lzma.PRESET_EXTREME)
    data = _MAGIC + struct.pack("<I", len(head)) + body
    Path(path).write_bytes(data)
    return len(data)


def load_compressed(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a file written by :func:`save_compressed` back into a state dict."""
    data = Path(path).read_bytes()
    if data[:4] != _MAGIC:
        raise ValueError(f"{path} is not a lightning-compress artifact (bad magic {data[:4]!r}).")
    (head_len,) = struct.unpack("<I", data[4:8])
    raw = lzma.decompress(data[8:])
    header, payload = json.loads(raw[:head_len]), raw[head_len:]
    out: dict[str, Tensor] = {}
    for entry in header:
        start = entry["offset"]
        shape = tuple(entry["shape"])
        count = int(np.prod(shape)) if shape else 1
        dtype = np.dtype(entry["dtype"]).newbyteorder("<")
        mask_len, values_len = entry["sizes"]
        mask = np.unpackbits(np.frombuffer(payload, np.uint8, mask_len, start))[:count].astype(bool)
        values = np.zeros(count, dtype.newbyteorder("="))
        values[mask] = np.frombuffer(payload, dtype, values_len // dtype.itemsize, start + mask_len)
        out[entry["name"]] = torch.from_numpy(values.reshape(shape))
    return out


def model_report(
    model: nn.Module, artifact_path: str | os.PathLike, selected: list[str] | None = None
) -> dict[str, float | int]:
    """The size figures of ``report.json``; writes the compact artifact to ``artifact_path``.

    ``sparsity`` is measured over the weights of the ``selected`` module names (the layers a pruning
    callback acts on) when given, else over every parameter. ``params`` and ``nonzero_params`` count every
    parameter of the model.
    """
    rows = compression_summary(model)
    params = sum(r.params for r in rows)
    nonzero = sum(r.nonzero for r in rows)
    if selected:
        modules = dict(model.named_modules())
        weights = [modules[n].weight.detach() for n in selected]
        total = sum(w.numel() for w in weights)
        sparsity = 1.0 - sum(int(torch.count_nonzero(w)) for w in weights) / total
    else:
        sparsity = 1.0 - nonzero / params if params else 0.0
    fp32 = fp32_size_bytes(_state_dict_without_quantizers(model))
    compressed = save_compressed(model, artifact_path)
    return {
        "sparsity": sparsity,
        "params": params,
        "nonzero_params": nonzero,
        "size_bytes_fp32": fp32,
        "size_bytes_compressed": compressed,
        "compression_ratio": fp32 / compressed,
    }
