"""Teacher–student distillation: losses (pure), teacher handling, and the KnowledgeDistillation callback."""

from lightning_compress.distillation.callback import KnowledgeDistillation
from lightning_compress.distillation.losses import agreement, feature_loss, kd_loss

__all__ = ["KnowledgeDistillation", "agreement", "feature_loss", "kd_loss"]
