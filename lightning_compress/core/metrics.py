"""Accuracy and agreement over a data loader, from torchmetrics: the one metric source of the package.

The app's report, the ONNX parity check, the sensitivity scan and the benchmarks all measure top-1 accuracy here,
so that one ``report.json`` never mixes two ways of counting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy


def _split(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def top1(num_classes: int) -> MulticlassAccuracy:
    """A micro-averaged top-1 accuracy metric (the fraction of samples whose arg-max is the label)."""
    return MulticlassAccuracy(num_classes=num_classes, average="micro", top_k=1)


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module | Callable[[Tensor], Tensor], loader: Iterable[Any], what: str = "loader"
) -> float:
    """Top-1 accuracy of ``model`` over the ``(input, label)`` batches of ``loader`` (eval mode, no gradients; a
    module's mode is restored).

    Raises:
        ValueError: ``loader`` yields no batch (``what`` names it in the message).

    Example:
        >>> net = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.eye(2)); _ = net.bias.zero_()
        >>> evaluate_accuracy(net, [(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))])
        0.5
    """
    metric: MulticlassAccuracy | None = None
    for logits, y in _labelled_logits(model, loader, what, "accuracy"):
        if metric is None:
            metric = top1(logits.shape[-1])
        metric.update(logits, y)
    assert metric is not None
    return float(metric.compute())


def _labelled_logits(
    model: nn.Module | Callable[[Tensor], Tensor], loader: Iterable[Any], what: str, measure: str
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(float logits, labels)`` on the CPU for every batch of ``loader``, the model in eval mode (a module's mode is
    restored afterwards).

    Raises:
        ValueError: A batch without labels, or no batch at all (``what`` names the loader, ``measure`` the figure).
    """
    module = model if isinstance(model, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    device = next(module.parameters()).device if module is not None and any(True for _ in module.parameters()) else None
    seen = False
    try:
        for batch in loader:
            x, y = _split(batch)
            if y is None:
                raise ValueError(f"{what} yields batches without labels; {measure} needs (input, label) batches.")
            seen = True
            yield model(x.to(device) if device is not None else x).float().cpu(), y.cpu()
    finally:
        if module is not None:
            module.train(was_training)
    if not seen:
        raise ValueError(f"{what} yielded no batch: there is nothing to measure {measure} on.")


def agreement(a: Tensor, b: Tensor) -> Tensor:
    """Fraction of samples whose arg-max over the last dimension is the same in ``a`` and ``b``.

    Example:
        >>> float(agreement(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 1.0], [3.0, 0.0]])))
        0.5
    """
    num_classes = a.shape[-1]
    metric = top1(num_classes).to(a.device)
    return metric(a.detach().reshape(-1, num_classes), b.detach().reshape(-1, num_classes).argmax(-1))


@torch.no_grad()
def evaluate_loss_and_accuracy(model: nn.Module, loader: Iterable[Any], what: str = "loader") -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` over the ``(input, label)`` batches of ``loader`` (eval mode,
    no gradients; the module's mode is restored). The loss is what a sensitivity scan ranks by: unlike accuracy, it
    moves with every small change.

    Raises:
        ValueError: ``loader`` yields no batch, or batches without labels.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.eye(2)); _ = net.bias.zero_()
        >>> batch = (torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
        >>> loss, acc = evaluate_loss_and_accuracy(net, [batch])
        >>> round(loss, 4), acc
        (0.8133, 0.5)
    """
    metric: MulticlassAccuracy | None = None
    total, count = 0.0, 0
    for logits, y in _labelled_logits(model, loader, what, "the loss"):
        if metric is None:
            metric = top1(logits.shape[-1])
        metric.update(logits, y)
        total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        count += len(y)
    assert metric is not None
    return total / count, float(metric.compute())
