"""lightning-compress: model compression as PyTorch Lightning callbacks.

Public API::

    from lightning_compress import MagnitudePruning, compression_summary
"""

from lightning_compress.artifacts import (
    LayerStats,
    compression_summary,
    load_compressed,
    model_report,
    save_compressed,
)
from lightning_compress.pruning import MagnitudePruning
from lightning_compress.selection import select_modules

__version__ = "0.1.0"

__all__ = [
    "LayerStats",
    "MagnitudePruning",
    "compression_summary",
    "load_compressed",
    "model_report",
    "save_compressed",
    "select_modules",
]
