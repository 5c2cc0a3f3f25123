"""A plain classification LightningModule: what the CLI trains. Nothing in it knows about compression."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress.core.checks import Choice, check_choice, check_number
from lightning_compress.tasks.data import UNLABELED


class Optimizer(Choice):
    """The optimizers the classification module offers."""

    SGD = "sgd"
    ADAMW = "adamw"


class ClassificationModule(pl.LightningModule):
    """Cross-entropy training of ``net`` with accuracy on validation and test.

    Args:
        net: The network (any ``nn.Module`` mapping a batch of inputs to logits).
        num_classes: Number of classes, for the accuracy metric.
        optimizer: ``"sgd"`` (Nesterov momentum 0.9) or ``"adamw"``.
        lr: Peak learning rate; it follows a cosine decay over the run.
        weight_decay: Weight decay.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        optimizer: str = "adamw",
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__()
        optimizer = check_choice("optimizer", optimizer, Optimizer).value
        check_number("lr", lr, 0, low_open=True)
        self.save_hyperparameters(ignore=["net"])
        # Kept as attributes too: a subclass's save_hyperparameters records its own arguments instead (LightningCLI).
        self.optimizer_name, self.lr, self.weight_decay = optimizer, lr, weight_decay
        self.net = net
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        labeled = y != UNLABELED  # label-scarce training: samples without a label do not enter the task loss
        loss = F.cross_entropy(logits[labeled], y[labeled]) if labeled.any() else logits.sum() * 0.0
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=self.weight_decay
            )
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
