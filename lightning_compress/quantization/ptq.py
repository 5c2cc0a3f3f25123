"""Post-training quantization: :func:`quantize_` calibrates a trained model's ranges on a few batches, no training.

The same quantizers as quantization-aware training (:func:`~lightning_compress.prepare_qat`, one
:class:`~lightning_compress.QATConfig`), observed in **evaluation** mode — BatchNorm normalises with its running
statistics and never updates them, dropout is off — over every calibration batch (the running minimum and maximum,
as ONNX Runtime's ``quantize_static`` MinMax calibration). Afterwards the model computes the integer model in
PyTorch, :func:`~lightning_compress.export_onnx` writes it as for QAT, and a
:class:`~lightning_compress.QuantizationAwareTraining` callback on the same model starts from the calibrated ranges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_compress.core.compiled import accepts_compiled
from lightning_compress.core.configs import QATConfig, resolve_config
from lightning_compress.quantization.prepare import all_quantizers, prepare_qat, quantized_layers

ForwardLoop = Callable[[nn.Module], Any]


def batches_loop(batches: Iterable[Any]) -> ForwardLoop:
    """A forward loop over calibration batches: each a tensor, a ``(input, target, ...)`` tuple or list (its first
    element is the input), or a mapping of keyword inputs (a Hugging Face batch)."""

    def loop(model: nn.Module) -> None:
        device = next(model.parameters()).device
        for batch in batches:
            if isinstance(batch, Mapping):
                model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            else:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device))

    return loop


@torch.no_grad()
@accepts_compiled()
def quantize_(
    model: nn.Module,
    config: QATConfig | Mapping[str, Any] | None = None,
    forward_loop: ForwardLoop | Iterable[Any] | None = None,
    **fields: Any,
) -> dict[str, nn.Module]:
    """Post-training quantization of ``model`` in place: prepare it as ``config`` asks (:func:`prepare_qat`), run
    ``forward_loop`` once in evaluation mode while every activation quantizer records the smallest and largest value
    it sees (weights: their current range), then quantize with those ranges.

    Args:
        model: A trained module (any ``nn.Module``); its train/eval mode is restored afterwards.
        config: A :class:`~lightning_compress.QATConfig` (or a mapping of its fields; keyword ``fields`` override).
        forward_loop: ``forward_loop(model)`` runs calibration batches through the model (ModelOpt's convention), or
            an iterable of batches (a DataLoader: tensors, ``(x, y)`` pairs, or mappings of keyword inputs).

    Returns:
        Name → quantized layer, as :func:`prepare_qat`.

    Raises:
        ValueError: No ``forward_loop``; one that ran no batch through the model; quantized layers that no batch
            reached (named, with the ``exclude`` that leaves them in float); what the config refuses.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
        >>> layers = quantize_(net, QATConfig(weight_bits=8), [torch.randn(16, 4) for _ in range(4)])
        >>> sorted(layers), bool(net[0].input_quantizer.initialized)
        (['0', '2'], True)
    """
    cfg = resolve_config(QATConfig, config, "weight_bits", fields)
    if forward_loop is None:
        raise ValueError(
            "quantize_ needs calibration data: pass `forward_loop` (a function that runs batches through the model) "
            "or an iterable of batches, e.g. a few batches of the training DataLoader."
        )
    layers = prepare_qat(model, cfg)
    calibrate_(model, forward_loop, all_quantizers(model))
    return layers


@torch.no_grad()
def calibrate_(model: nn.Module, forward_loop: ForwardLoop | Iterable[Any], quantizers: list[Any]) -> None:
    """Observe the ranges of ``quantizers`` (on a prepared ``model``) afresh over ``forward_loop`` in evaluation mode,
    then quantize with them: the calibration of :func:`quantize_`, also used by a
    :class:`~lightning_compress.QuantizationAwareTraining` run that stopped before it quantized.

    Raises:
        ValueError: The loop ran no batch; a quantized layer that no batch reached (named).
    """
    loop = forward_loop if callable(forward_loop) else batches_loop(forward_loop)
    calls = [0]

    def count(module: nn.Module, args: Any) -> None:
        calls[0] += 1

    handle = model.register_forward_pre_hook(count)
    was_training = model.training
    model.eval()
    for q in quantizers:
        q.reset_range()
        q.observing, q.quantizing, q.calibrating = True, False, True
        q.train()  # observe activations, while every other module computes in evaluation mode
    try:
        loop(model)
    finally:
        handle.remove()
        for q in quantizers:
            q.observing, q.quantizing, q.calibrating = False, True, False
        model.train(was_training)
    if calls[0] == 0:
        raise ValueError(
            "Calibration: the forward_loop ran no batch through the model, so no range was observed. It must call "
            "model(batch) at least once (an empty DataLoader?)."
        )
    missed = [name for name, layer in quantized_layers(model).items() if not layer.input_quantizer.initialized]
    if missed:
        raise ValueError(
            f"Calibration: no calibration batch reached layer(s) {', '.join(map(repr, missed))}, so their input ranges "
            f"are unknown. Calibrate with batches that reach them, or leave them in float with exclude={missed!r}."
        )
