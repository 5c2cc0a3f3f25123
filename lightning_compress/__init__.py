"""lightning-compress: model compression as PyTorch Lightning callbacks.

Public API::

    from lightning_compress import MagnitudePruning, QuantizationAwareTraining, export_onnx, compression_summary
"""

from lightning_compress.artifacts import (
    LayerStats,
    compression_summary,
    load_compressed,
    model_report,
    save_compressed,
)
from lightning_compress.distillation import KnowledgeDistillation
from lightning_compress.pruning import MagnitudePruning
from lightning_compress.quantization import QuantizationAwareTraining
from lightning_compress.quantization.export import export_onnx, onnx_parity
from lightning_compress.recipes import available_recipes, load_recipe
from lightning_compress.selection import select_modules
from lightning_compress.targets import CompressionTarget

__version__ = "0.1.0"

__all__ = [
    "CompressionTarget",
    "KnowledgeDistillation",
    "LayerStats",
    "available_recipes",
    "MagnitudePruning",
    "QuantizationAwareTraining",
    "compression_summary",
    "export_onnx",
    "load_compressed",
    "load_recipe",
    "model_report",
    "onnx_parity",
    "save_compressed",
    "select_modules",
]
