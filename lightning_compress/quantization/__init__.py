"""Quantization-aware training: fake quantizers (pure), attaching them, the callback, the ONNX export."""

from lightning_compress.quantization.callback import QuantizationAwareTraining
from lightning_compress.quantization.quantizers import FakeQuantizer, QuantSpec, fake_quantize

__all__ = ["FakeQuantizer", "QuantSpec", "QuantizationAwareTraining", "fake_quantize"]
