"""A teacher for the CLI's distillation recipes: trained on the recipe's data, or loaded from a checkpoint."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn

from lightning_compress.core.cache import StageCache
from lightning_compress.instantiate import instantiate, plain
from lightning_compress.tasks.module import ClassificationModule

log = logging.getLogger(__name__)


def train_teacher(
    model: Any,
    data: Any,
    max_epochs: int = 30,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    save_to: str | os.PathLike | None = None,
    lr: float = 3e-3,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Build the teacher network from ``model`` (a config) for ``data`` (a data-module config); load it from
    ``checkpoint`` when given (a Lightning checkpoint of a ClassificationModule), else train it for ``max_epochs``
    (and save that checkpoint to ``save_to``). Returns the network, whose forward gives the logits.

    With ``cache_dir`` (the app sets the sweep's ``stages`` directory), a teacher is trained once per distinct
    setting (``model``, ``data``, ``max_epochs``, ``seed``, ``lr``: a hash of them names its checkpoint there) and
    every later call with the same settings loads it; a cached checkpoint that does not load is trained again with
    a warning (:class:`~lightning_compress.core.cache.StageCache`)."""
    with isolate_rng():  # the caller's random streams continue as if no teacher was built, cached or trained
        return _teacher(model, data, max_epochs, seed, checkpoint, save_to, lr, cache_dir)


def _teacher(
    model: Any, data: Any, max_epochs: int, seed: int, checkpoint: Any, save_to: Any, lr: float, cache_dir: Any
) -> nn.Module:
    from lightning_compress.distillation.teachers import build_teacher

    datamodule = instantiate(data)

    def fresh() -> ClassificationModule:
        # Seeded here, so that the teacher is a function of its settings alone (a cached one is the same network).
        pl.seed_everything(seed)
        net = instantiate(model, input_shape=datamodule.input_shape, num_classes=datamodule.num_classes)
        return ClassificationModule(net, num_classes=datamodule.num_classes, lr=lr)

    module = fresh()
    if checkpoint is not None:
        build_teacher(module, checkpoint)
        return module.net
    cache = StageCache(cache_dir) if cache_dir is not None else None
    settings = {"model": plain(model), "data": plain(data), "max_epochs": max_epochs, "seed": seed, "lr": lr}
    if cache is not None:
        if cache.load("teacher", settings, lambda p: build_teacher(module, p), ".ckpt") is not None:
            log.info("Reusing the teacher trained with the same settings: %s", cache.path("teacher", settings, ".ckpt"))
            if save_to is not None:
                shutil.copyfile(cache.path("teacher", settings, ".ckpt"), save_to)
            return module.net
        module = fresh()  # a checkpoint that failed to load may have changed some weights
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    if save_to is not None:
        trainer.save_checkpoint(os.fspath(save_to))
    if cache is not None:
        path = cache.store("teacher", settings, lambda p: trainer.save_checkpoint(os.fspath(p)), ".ckpt")
        log.info("Teacher stored for reuse by later jobs with the same settings: %s", path)
    return module.net
