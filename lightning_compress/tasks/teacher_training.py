"""A teacher for the CLI's distillation recipes: trained on the recipe's data, or loaded from a checkpoint."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_compress.instantiate import instantiate
from lightning_compress.tasks.module import ClassificationModule


def train_teacher(
    model: Any,
    data: Any,
    max_epochs: int = 30,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    save_to: str | os.PathLike | None = None,
    lr: float = 3e-3,
) -> nn.Module:
    """Build the teacher network from ``model`` (a config) for ``data`` (a data-module config); load it from
    ``checkpoint`` when given (a Lightning checkpoint of a ClassificationModule), else train it for ``max_epochs``
    (and save that checkpoint to ``save_to``). Returns the network, whose forward gives the logits."""
    datamodule = instantiate(data)
    net = instantiate(model, input_shape=datamodule.input_shape, num_classes=datamodule.num_classes)
    module = ClassificationModule(net, num_classes=datamodule.num_classes, lr=lr)
    if checkpoint is not None:
        from lightning_compress.distillation.teachers import build_teacher

        build_teacher(module, checkpoint)
        return net
    pl.seed_everything(seed)
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    if save_to is not None:
        trainer.save_checkpoint(os.fspath(save_to))
    return net
