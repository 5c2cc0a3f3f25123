"""Quantization-aware training: the Trainer-free form (:class:`QATConfig` + :func:`prepare_qat`) and the
QuantizationAwareTraining callback that drives it. The quantizers are in :mod:`lightning_compress.core.quantizers`;
the convert step is :func:`lightning_compress.export.onnx.export_onnx`.
"""

from lightning_compress.core.quantizers import FakeQuantizer, QuantSpec, fake_quantize
from lightning_compress.quantization.callback import QuantizationAwareTraining
from lightning_compress.quantization.prepare import QATConfig, float_state_dict, prepare_qat, set_phase, unprepare

__all__ = [
    "FakeQuantizer",
    "QATConfig",
    "QuantSpec",
    "QuantizationAwareTraining",
    "fake_quantize",
    "float_state_dict",
    "prepare_qat",
    "set_phase",
    "unprepare",
]
