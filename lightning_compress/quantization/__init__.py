"""Quantization: the Trainer-free forms (:class:`QATConfig` + :func:`prepare_qat` for quantization-aware training,
:func:`quantize_` for post-training quantization) and the QuantizationAwareTraining callback that drives QAT. The
quantizers are in :mod:`lightning_compress.core.quantizers`; the convert step is
:func:`lightning_compress.export.onnx.export_onnx`.
"""

from lightning_compress.core.quantizers import FakeQuantizer, QuantSpec, fake_quantize
from lightning_compress.quantization.callback import QuantizationAwareTraining
from lightning_compress.quantization.prepare import (
    QATConfig,
    float_state_dict,
    prepare_qat,
    qat_state_dict,
    set_phase,
    unprepare,
)
from lightning_compress.quantization.ptq import quantize_

__all__ = [
    "FakeQuantizer",
    "QATConfig",
    "QuantSpec",
    "QuantizationAwareTraining",
    "fake_quantize",
    "float_state_dict",
    "prepare_qat",
    "qat_state_dict",
    "quantize_",
    "set_phase",
    "unprepare",
]
