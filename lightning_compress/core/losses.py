"""Distillation losses. Pure functions: no Lightning, no hooks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` averaged over the batch (Hinton et al. 2015).

    Computed in float32 whatever the inputs' precision (under fp16 / bf16 mixed precision the softmax of scaled
    logits would lose the small probabilities the soft targets carry), with log-probabilities on both sides so
    that it stays finite even where a probability underflows to 0. The T² factor keeps the gradient's size
    independent of the temperature.

    Example:
        >>> s = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(kd_loss(s, s))
        0.0
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher outputs differ in shape: student {tuple(student_logits.shape)}, "
            f"teacher {tuple(teacher_logits.shape)}."
        )
    device = student_logits.device.type
    if torch.is_autocast_enabled(device):
        with torch.autocast(device_type=device, enabled=False):
            return kd_loss(student_logits, teacher_logits, temperature)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def feature_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Mean squared error between (adapted) student features and teacher features, in float32 (FitNets hints)."""
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"feature shapes differ after the adapter: student {tuple(student_features.shape)}, "
            f"teacher {tuple(teacher_features.shape)}."
        )
    return F.mse_loss(student_features.float(), teacher_features.float())
