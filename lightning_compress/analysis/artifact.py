"""The compact artifact (``model.lcz``): a real file whose size is the ``size_bytes_compressed`` of ``report.json``.

For every tensor a bitmask of its non-zeros plus the non-zero values (quantized weights as their integers) — or, for a
tensor whose non-zeros share at most 256 values (weight clustering), those values once (the codebook) and each
non-zero's index into them at ``⌈log2 k⌉`` bits — the whole payload entropy-coded with the standard library's
``lzma``. :func:`save_compressed` writes it,
:func:`load_compressed` reads it back exactly.
"""

from __future__ import annotations

import json
import lzma
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lightning_compress.core.clustering import index_bits
from lightning_compress.export.onnx import export_form
from lightning_compress.quantization.prepare import quantized_layers

_MAGIC = b"LCZ1"
#: A tensor whose non-zeros share at most this many values is stored as a codebook plus indices (when smaller).
CODEBOOK_MAX = 256


def _state_dict(obj: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    sd = obj.state_dict() if isinstance(obj, nn.Module) else dict(obj)
    return {k: v.detach().cpu() for k, v in sd.items() if isinstance(v, Tensor)}


def fp32_size_bytes(obj: nn.Module | Mapping[str, Tensor]) -> int:
    """Bytes of the state dict stored densely with every floating-point tensor in float32."""
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in _state_dict(obj).values())


def compressed_state(model: nn.Module) -> dict[str, Tensor]:
    """What the compact artifact stores for ``model``.

    A model without quantized layers: its state dict. A model after quantization-aware training: its export
    form (BatchNorms folded) with every quantized layer's weight as **integers** (``<layer>.weight``, int8) next to
    its scales (``<layer>.weight_scale``) and its input activation's scale and zero-point.
    """
    if not quantized_layers(model):
        return _state_dict(model)
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
    float32, integers in their own type: int8 for quantized weights) or, when its non-zeros share at most 256 values
    and that is smaller, their codebook plus ``⌈log2 k⌉``-bit indices; the payload is compressed with ``lzma``.
    A model is stored as :func:`compressed_state` gives it (integers for quantized layers). Loading it back with
    :func:`load_compressed` gives those tensors exactly (floating point as float32).
    """
    tensors = compressed_state(obj) if isinstance(obj, nn.Module) else _state_dict(obj)
    header, chunks, offset = [], [], 0
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
    try:
        (head_len,) = struct.unpack("<I", data[4:8])
        raw = lzma.decompress(data[8:])
        header, payload = json.loads(raw[:head_len].decode()), raw[head_len:]
    except (struct.error, lzma.LZMAError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is a damaged lightning-compress artifact (truncated or corrupt: {type(err).__name__}: {err}); "
            "write it again with save_compressed."
        ) from None
    out: dict[str, Tensor] = {}
    for entry in header:
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
        out[entry["name"]] = torch.from_numpy(values.reshape(shape))
    return out


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
