"""lightning-compress: model compression as PyTorch Lightning callbacks.

Public API::

    from lightning_compress import MagnitudePruning, QuantizationAwareTraining, export_onnx, compression_summary

The package is layered, imports pointing down only (``tests/test_layers.py`` enforces it):

* ``core`` — pure tensor and module code: masks, schedules, quantizers, losses, selection, checks, metrics, protocol;
* adapters — ``pruning``, ``quantization``, ``distillation``, ``lowrank``, ``clustering`` (callbacks and their
  Trainer-free forms), ``export``, ``trainer`` (what callbacks share about a running Trainer);
* ``analysis`` — size report, compact artifact, sensitivity scan, Pareto front (no Hydra, no rich);
* ``apps`` — the Hydra apps, recipes, terminal report, W&B wiring.

``tasks`` (data modules, models, the classification module) is one user of the library, beside the apps.
"""

from typing import TYPE_CHECKING, Any

from lightning_compress.analysis.artifact import load_compressed, save_compressed
from lightning_compress.analysis.report import LayerStats, compression_summary, model_report
from lightning_compress.clustering import WeightClustering, cluster_weights_
from lightning_compress.core.checks import ArgumentTypeError
from lightning_compress.core.configs import (
    ClusteringConfig,
    ConfigError,
    DistillationConfig,
    LowRankConfig,
    PruningConfig,
    QATConfig,
)
from lightning_compress.core.losses import distillation_loss
from lightning_compress.core.selection import select_modules
from lightning_compress.distillation import KnowledgeDistillation
from lightning_compress.export.compact import export_compact
from lightning_compress.export.onnx import ExportMismatchError, export_onnx, onnx_parity
from lightning_compress.lowrank import LowRankFactorization, low_rank_
from lightning_compress.pruning import MagnitudePruning, prune_
from lightning_compress.quantization import QuantizationAwareTraining, prepare_qat, quantize_
from lightning_compress.trainer.checkpoint_selection import CompressionTarget
from lightning_compress.trainer.loop import CompressionLoop

if TYPE_CHECKING:
    from lightning_compress.apps.recipes import available_recipes, load_recipe

__version__ = "0.1.0"

#: Names that load their module on first use: the recipes compose Hydra configs, and ``import lightning_compress``
#: loads no Hydra (nor rich, nor W&B) for a user who only adds a callback to a Trainer.
_LAZY = {"available_recipes": "lightning_compress.apps.recipes", "load_recipe": "lightning_compress.apps.recipes"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_compress' has no attribute {name!r}")


__all__ = [
    "ArgumentTypeError",
    "ClusteringConfig",
    "CompressionLoop",
    "CompressionTarget",
    "ConfigError",
    "DistillationConfig",
    "ExportMismatchError",
    "KnowledgeDistillation",
    "LayerStats",
    "LowRankConfig",
    "LowRankFactorization",
    "MagnitudePruning",
    "PruningConfig",
    "QATConfig",
    "QuantizationAwareTraining",
    "WeightClustering",
    "available_recipes",
    "cluster_weights_",
    "compression_summary",
    "distillation_loss",
    "export_compact",
    "export_onnx",
    "load_compressed",
    "load_recipe",
    "low_rank_",
    "model_report",
    "onnx_parity",
    "prepare_qat",
    "prune_",
    "quantize_",
    "save_compressed",
    "select_modules",
]
