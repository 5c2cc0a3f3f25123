"""Distillation losses. Pure functions: no Lightning, no hooks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from lightning_compress.core.configs import DistillationConfig


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0, mask: Tensor | None = None
) -> Tensor:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` averaged over the predictions (Hinton et al. 2015):
    over the batch for ``(batch, classes)`` logits, over every token for a sequence model's ``(batch, tokens, vocab)``
    (the classes are the last dimension) — so a 16-token sequence weighs as much as one sample, not 16 times more.
    ``mask`` (the logits' shape without the last dimension, e.g. an ``attention_mask``) keeps the positions where it
    is non-zero: padding does not count.

    Computed in float32 whatever the inputs' precision (under fp16 / bf16 mixed precision the softmax of scaled
    logits would lose the small probabilities the soft targets carry), with log-probabilities on both sides so
    that it stays finite even where a probability underflows to 0. The T² factor keeps the gradient's size
    independent of the temperature. A language model's vocabulary-sized logits (above :data:`CHUNK` values) are taken
    a chunk at a time, the gradient written as it goes: the loss makes no copy of the logits beyond the gradient the
    student gets anyway (a second backward through it, ``retain_graph=True``, is refused).

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
    if mask is not None and tuple(mask.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            f"`mask` must have the logits' shape without the class dimension, {tuple(student_logits.shape[:-1])}, "
            f"got {tuple(mask.shape)}."
        )
    device = student_logits.device.type
    if torch.is_autocast_enabled(device):
        with torch.autocast(device_type=device, enabled=False):
            return kd_loss(student_logits, teacher_logits, temperature, mask)
    per_prediction = _per_prediction_kl(student_logits, teacher_logits, temperature)
    if mask is None:
        kl = per_prediction.mean()
    else:
        keep = mask.to(per_prediction.dtype)
        kl = (per_prediction * keep).sum() / keep.sum().clamp_min(1.0)
    return kl * temperature**2


#: Logit values the KL divergence works on at a time (4 Mi: 16 MiB in float32). Logits up to this size are computed in
#: one piece; larger ones (a language model's batch × tokens × vocabulary) by chunks of predictions.
CHUNK = 1 << 22


def _log_probabilities(student: Tensor, teacher: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``log softmax(student / T)`` and ``log softmax(teacher / T)`` over the last dimension, in float32."""
    return (F.log_softmax(student.float() / temperature, dim=-1), F.log_softmax(teacher.float() / temperature, dim=-1))


def _kl_rows(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(teacher / T) ‖ softmax(student / T))`` of each row of ``(rows, classes)`` logits, in float32."""
    log_p_student, log_p_teacher = _log_probabilities(student, teacher, temperature)
    return F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1)


class _ChunkedKL(torch.autograd.Function):
    """Per-row ``KL(softmax(teacher / T) ‖ softmax(student / T))`` of ``(rows, classes)`` logits, computed
    ``chunk`` rows at a time, with its gradient ``(softmax(student / T) − softmax(teacher / T)) / T`` written into one
    tensor of the student's shape and type as it goes: the only copy of the logits the loss makes is the gradient the
    student gets anyway (the backward scales it in place)."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, teacher: Tensor, temperature: float, chunk: int) -> Tensor:
        gradient = torch.empty_like(student)
        kl = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
        for start in range(0, student.shape[0], chunk):
            rows = slice(start, start + chunk)
            log_p_student, log_p_teacher = _log_probabilities(student[rows], teacher[rows], temperature)
            p_teacher = log_p_teacher.exp()
            kl[rows] = (p_teacher * (log_p_teacher - log_p_student)).sum(-1)
            gradient[rows] = ((log_p_student.exp() - p_teacher) / temperature).to(gradient.dtype)
        ctx.save_for_backward(gradient)
        ctx.consumed = False
        return kl

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None, None]:
        if ctx.consumed:
            raise RuntimeError(
                "kd_loss on logits of more than lightning_compress.core.losses.CHUNK values keeps one gradient and "
                "scales it in place: a second backward through it (retain_graph=True) is not supported."
            )
        ctx.consumed = True
        (gradient,) = ctx.saved_tensors
        return gradient.mul_(grad_output.reshape(-1, 1).to(gradient.dtype)), None, None, None


def _per_prediction_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """:func:`_kl_rows` of every prediction (the logits' shape without the last dimension): in one piece up to
    :data:`CHUNK` values, else :class:`_ChunkedKL` by chunks of rows (a teacher that itself takes a gradient: each
    chunk checkpointed, its float32 intermediates recomputed in the backward pass)."""
    classes = student_logits.shape[-1]
    student, teacher = student_logits.reshape(-1, classes), teacher_logits.reshape(-1, classes)
    if student.numel() <= CHUNK:
        return _kl_rows(student, teacher, temperature).reshape(student_logits.shape[:-1])
    rows = max(1, CHUNK // classes)
    if not teacher.requires_grad:
        kl: Tensor = _ChunkedKL.apply(student, teacher.detach(), temperature, rows)
        return kl.reshape(student_logits.shape[:-1])
    from torch.utils.checkpoint import checkpoint

    parts = [
        checkpoint(_kl_rows, s, t, temperature, use_reentrant=False)
        for s, t in zip(student.split(rows), teacher.split(rows), strict=True)
    ]
    return torch.cat(parts).reshape(student_logits.shape[:-1])


def feature_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Mean squared error between (adapted) student features and teacher features, in float32 (FitNets hints)."""
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"feature shapes differ after the adapter: student {tuple(student_features.shape)}, "
            f"teacher {tuple(teacher_features.shape)}."
        )
    return F.mse_loss(student_features.float(), teacher_features.float())


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | Sequence[Tensor],
    task_loss: Tensor | None = None,
    config: DistillationConfig | Mapping[str, Any] | None = None,
    teacher_weights: Sequence[float] | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """The distillation objective as :class:`~lightning_compress.KnowledgeDistillation` computes it, for any training
    loop (Fabric, plain PyTorch): ``(1 − alpha) · task_loss + alpha · Σ_i w_i · kd_loss(student, teacher_i, T)`` with
    ``T`` and ``alpha`` from ``config`` (a :class:`~lightning_compress.DistillationConfig` or a mapping of its
    fields); without a ``task_loss``
    (or with ``alpha=1``) the distillation term alone. Several teachers' terms are weighted by ``teacher_weights``
    (equal by default, normalised to sum 1). For a sequence model the term is averaged over tokens, and ``mask`` (e.g.
    the batch's ``attention_mask``) leaves padding out (:func:`kd_loss`).

    Example:
        >>> from lightning_compress.core.configs import DistillationConfig
        >>> s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]])
        >>> float(distillation_loss(s, t, torch.tensor(1.0), DistillationConfig(alpha=0.25)))
        0.75
    """
    from lightning_compress.core.configs import DistillationConfig, resolve_config

    config = resolve_config(DistillationConfig, config, "temperature", {})
    teachers = [teacher_logits] if isinstance(teacher_logits, Tensor) else list(teacher_logits)
    weights = [1.0] * len(teachers) if teacher_weights is None else [float(w) for w in teacher_weights]
    if not teachers or len(weights) != len(teachers) or sum(weights) <= 0 or min(weights) < 0:
        raise ValueError(
            f"`teacher_weights` must hold {len(teachers)} non-negative numbers with a positive sum, got "
            f"{teacher_weights!r}."
        )
    total = sum(weights)
    distill = sum(
        w / total * kd_loss(student_logits, t, config.temperature, mask) for w, t in zip(weights, teachers, strict=True)
    )
    assert isinstance(distill, Tensor)
    return blend(distill, task_loss, config.alpha)


def blend(distill: Tensor, task_loss: Tensor | None, alpha: float) -> Tensor:
    """``(1 − alpha) · task_loss + alpha · distill``; the distillation term alone without a task loss or at
    ``alpha=1`` (pure distillation: the labels play no part)."""
    if task_loss is None or alpha == 1.0:
        return distill
    return (1.0 - alpha) * task_loss + alpha * distill
