"""Size accounting: one place that says how big a (compressed) model is.

* :func:`compression_summary` — per-layer parameters, non-zeros, sparsity, bits and bytes, without a Trainer.
* :func:`flops_per_sample` — the floating-point operations of one forward pass (``torch.utils.flop_counter``).
* :func:`model_report` — the size figures of ``report.json`` (it writes the compact artifact of
  :mod:`lightning_compress.analysis.artifact`, proves that it restores, and measures it).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypedDict

import torch
from torch import nn

from lightning_compress.analysis.artifact import codebook_pays, fp32_size_bytes, save_compressed
from lightning_compress.core.clustering import distinct_nonzero, index_bits
from lightning_compress.core.compiled import accepts_compiled
from lightning_compress.core.quantizers import FakeQuantizer
from lightning_compress.quantization.prepare import float_state_dict


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


def _weight_bits(module: nn.Module, nonzero: int) -> tuple[int, int]:
    """Bits per non-zero weight (``nonzero`` of them) and the bytes of its codebook: the weight quantizer's bits under
    quantization-aware training; ``⌈log2 k⌉`` bits plus ``k`` float32 values for a weight that the artifact stores as a
    codebook (:func:`~lightning_compress.analysis.artifact.codebook_pays`: weight clustering); else 32 and none."""
    spec = getattr(getattr(module, "weight_quantizer", None), "spec", None)
    if spec is not None:
        return int(spec.bits), 0
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        distinct = distinct_nonzero(weight)
        if codebook_pays(distinct, nonzero):
            return index_bits(distinct), 4 * distinct
    return 32, 0


@accepts_compiled()
def compression_summary(model: nn.Module) -> list[LayerStats]:
    """Per-layer figures for every module that owns parameters (its own, not its children's).

    ``bytes`` is the in-memory size of those parameters (``numel × element_size``). ``bits`` is the weight's
    bit-width (a quantized layer's weight quantizer; ``⌈log2 k⌉`` for a clustered weight sharing ``k`` values; 32
    otherwise) and ``packed_bytes`` what the layer takes as the compact artifact lays it out before lzma: a bitmask of
    the non-zeros plus the non-zero weights at ``bits`` (and a clustered weight's codebook of ``k`` float32 values) and
    the other parameters (bias) at 32 bits.

    Example:
        >>> net = nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight[0].zero_()
        >>> row = compression_summary(net)[0]
        >>> (row.params, row.nonzero, round(row.sparsity, 2))
        (10, 6, 0.4)
    """
    rows = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own or isinstance(module, FakeQuantizer):  # a learned scale is part of its layer's encoding
            continue
        weight = getattr(module, "weight", None)
        nonzero = {id(p): int(torch.count_nonzero(p.detach())) for p in own}
        bits, codebook = _weight_bits(module, nonzero.get(id(weight), 0))
        packed = codebook + sum(
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


@accepts_compiled()
def flops_per_sample(model: nn.Module, example_input: torch.Tensor) -> int:
    """Floating-point operations of one forward pass, per sample (``torch.utils.flop_counter``; a multiply-add counts
    two). Dense: the zeros that unstructured pruning leaves are still multiplied, and fake quantization is not counted.
    Computed in evaluation mode without gradients; the model's mode is restored.

    Example:
        >>> flops_per_sample(nn.Linear(4, 2), torch.zeros(3, 4))
        16
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example_input)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // max(1, len(example_input))


class SizeReport(TypedDict):
    """The size figures of ``report.json`` (:func:`model_report`)."""

    sparsity: float  #: zeros among the selected weights (or every parameter)
    params: int
    nonzero_params: int
    size_bytes_fp32: int  #: the user's model (quantizer bookkeeping not counted) as float32
    size_bytes_compressed: int  #: the deploy form of the compact artifact: the smallest file
    size_bytes_artifact: int  #: the model form (``model.lcz``), which loads back into the model
    compression_ratio: float  #: size_bytes_fp32 / size_bytes_compressed


@accepts_compiled()
def model_report(
    model: nn.Module,
    artifact_path: str | os.PathLike,
    selected: list[str] | None = None,
    example_input: torch.Tensor | None = None,
) -> SizeReport:
    """The size figures of ``report.json``; writes the compact artifact to ``artifact_path`` (the model form, which
    :func:`~lightning_compress.load_compressed` restores into the model) and its deploy form beside it
    (``<name>.deploy.lcz``, the smallest file, whose size the ratio counts).

    ``sparsity`` is measured over the weights of the ``selected`` module names (the layers a pruning
    callback acts on) when given, else over every parameter. ``params`` and ``nonzero_params`` count every
    parameter of the model. With ``example_input`` the artifact is proven first: restored into a copy of the model,
    it computes exactly what the model computes on it (else it is removed and ``ExportMismatchError`` raised).
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
    # The fp32 reference is the user's model: quantizer buffers (scales, observed ranges) are not part of it.
    fp32 = fp32_size_bytes(float_state_dict(model.state_dict()))
    path = Path(artifact_path)
    artifact = save_compressed(model, path)
    if example_input is not None:
        check_restores(model, path, example_input)
    compressed = save_compressed(model, path.with_suffix(".deploy.lcz"), deploy=True)
    return {
        "sparsity": sparsity,
        "params": params,
        "nonzero_params": nonzero,
        "size_bytes_fp32": fp32,
        "size_bytes_compressed": compressed,
        "size_bytes_artifact": artifact,
        "compression_ratio": fp32 / compressed,
    }


@torch.no_grad()
def check_restores(model: nn.Module, path: Path, example_input: torch.Tensor) -> None:
    """Restore the artifact at ``path`` into a copy of ``model`` and require identical outputs on ``example_input``
    (both in evaluation mode); the file is removed when they differ.

    Raises:
        ExportMismatchError: The restored copy computes something else (the largest difference named).
    """
    from lightning_compress.analysis.artifact import load_compressed
    from lightning_compress.export.onnx import ExportMismatchError, _copy_module

    copy = load_compressed(path, _copy_module(model))
    was_training = model.training
    model.eval()
    try:
        expected, got = model(example_input), copy.eval()(example_input)
    finally:
        model.train(was_training)
    if not torch.equal(expected, got):
        path.unlink()
        raise ExportMismatchError(
            f"save_compressed: {path.name} restored into the model computes something else (largest difference "
            f"{float((expected - got).abs().max()):.3g}); it was not kept."
        )
