"""Teacher–student distillation: the KnowledgeDistillation callback and how it builds its teachers.

The losses are pure functions in :mod:`lightning_compress.core.losses`.
"""

from lightning_compress.core.losses import distillation_loss, feature_loss, kd_loss
from lightning_compress.distillation.callback import KnowledgeDistillation

__all__ = ["KnowledgeDistillation", "distillation_loss", "feature_loss", "kd_loss"]
