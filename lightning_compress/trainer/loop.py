"""The techniques in a training loop you write yourself — Lightning Fabric, or plain PyTorch.

A compression callback decides *when* from what a Trainer tells it (optimizer steps, epochs, the run's length) and
acts after every optimizer step. :class:`CompressionLoop` tells it the same from your loop, and runs it in the
optimizer's own step hooks (``torch.optim.Optimizer.register_step_pre_hook`` / ``register_step_post_hook``), so the
loop itself gains no line per step::

    pruning = MagnitudePruning(final_sparsity=0.9, end_epoch=8)
    qat = QuantizationAwareTraining()
    loop = CompressionLoop(model, [pruning, qat], steps_per_epoch=len(loader), max_epochs=10, train_dataloader=loader)
    optimizer = torch.optim.Adam(model.parameters())     # after the loop object: QAT may add parameters
    model, optimizer = fabric.setup(model, optimizer)
    loop.start(optimizer, fabric)
    for epoch in range(10):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()                              # the techniques act here
    loop.finish()                                         # final structure if the loop stopped early; tables

The techniques are the callbacks themselves, with the same arguments and the same checks. A LightningModule is driven
as it is (its ``self.log`` goes to Fabric's loggers); any other module is hosted by a LightningModule for the
techniques, so the names they report start with ``model.``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.optim import Optimizer

from lightning_compress.core.checks import check_number


class _Host(pl.LightningModule):
    """A LightningModule around a plain module, for the techniques' logging (through Fabric) and checks."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class _NoLoggers:
    """Where the techniques' ``self.log`` goes in a loop without Fabric: nowhere (there is no logger to take it), and
    without Lightning's warning that the module has no Trainer."""

    def log_dict(self, metrics: Any, step: int | None = None) -> None:
        pass


class _Strategy:
    """What a technique asks of a Trainer's strategy: collectives across processes (Fabric's, else none)."""

    def __init__(self, fabric: Any) -> None:
        self.fabric = fabric

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj if self.fabric is None else self.fabric.broadcast(obj, src=src)

    def reduce(self, tensor: Any, reduce_op: str = "mean") -> Any:
        return tensor if self.fabric is None else self.fabric.all_reduce(tensor, reduce_op=reduce_op)

    def all_gather(self, tensor: Any) -> Any:
        return tensor.unsqueeze(0) if self.fabric is None else self.fabric.all_gather(tensor)


class _LoopState:
    """The parts of a Trainer that a technique reads, for a loop that is not a Trainer's."""

    fast_dev_run = False
    overfit_batches = 0
    accumulate_grad_batches = 1
    max_steps = -1
    should_stop = False
    received_sigterm = False
    sanity_checking = False
    log_every_n_steps = 50
    datamodule = None

    def __init__(
        self, callbacks: list[Callback], steps_per_epoch: int, max_epochs: int, fabric: Any, loader: Any, root: str
    ) -> None:
        self.callbacks, self.num_training_batches, self.max_epochs = callbacks, steps_per_epoch, max_epochs
        self.fabric, self.train_dataloader, self.default_root_dir = fabric, loader, root
        self.strategy = _Strategy(fabric)
        self.loggers: list[Any] = []
        self.global_step = 0

    @property
    def estimated_stepping_batches(self) -> int:
        return self.num_training_batches * self.max_epochs

    @property
    def current_epoch(self) -> int:
        return self.global_step // self.num_training_batches

    @property
    def world_size(self) -> int:
        return 1 if self.fabric is None else int(self.fabric.world_size)

    @property
    def is_global_zero(self) -> bool:
        return self.fabric is None or bool(self.fabric.is_global_zero)


class CompressionLoop:
    """Run compression callbacks in your own training loop (see the module's docstring).

    Args:
        model: The module to compress (a LightningModule, or any ``nn.Module``); prepared here (e.g. QAT's quantizers),
            so create the optimizer afterwards.
        techniques: The compression callbacks (``MagnitudePruning``, ``QuantizationAwareTraining``,
            ``LowRankFactorization``, ``WeightClustering``), with the arguments they take on a Trainer.
        steps_per_epoch: Optimizer steps per epoch (the schedules are in epochs).
        max_epochs: The loop's length in epochs (a schedule past it is refused, as on a Trainer).
        train_dataloader: Where a technique draws an example input (channel groups, FLOPs budgets) and, when the loop
            stops before quantization, calibration batches.
        root_dir: Where tables go when no logger takes them.

    Raises:
        ValueError: What the techniques refuse on a Trainer (named as there); ``steps_per_epoch`` or ``max_epochs``
            not a positive integer.
    """

    def __init__(
        self,
        model: nn.Module,
        techniques: Sequence[Callback],
        *,
        steps_per_epoch: int,
        max_epochs: int,
        train_dataloader: Any = None,
        root_dir: str | os.PathLike = ".",
    ) -> None:
        check_number("steps_per_epoch", steps_per_epoch, 1, integer=True)
        check_number("max_epochs", max_epochs, 1, integer=True)
        self.model = model
        self.module = model if isinstance(model, pl.LightningModule) else _Host(model)
        self.techniques = list(techniques)
        self.state = _LoopState(self.techniques, steps_per_epoch, max_epochs, None, train_dataloader, str(root_dir))
        self._hooks: list[Any] = []
        self._previous_fabric: Any = None
        for technique in self.techniques:
            technique.setup(self.state, self.module, "fit")  # type: ignore[arg-type]

    def start(self, optimizer: Optimizer, fabric: Any = None) -> None:
        """Hook the techniques into ``optimizer``'s steps (Fabric's wrapped optimizer or its inner one both work) and
        start training: call once, after ``fabric.setup``, before the first step."""
        inner = getattr(optimizer, "optimizer", optimizer)  # Fabric's _FabricOptimizer wraps the torch optimizer
        self.state.fabric, self.state.strategy = fabric, _Strategy(fabric)
        self._previous_fabric = self.module._fabric
        self.module._fabric = fabric if fabric is not None else _NoLoggers()  # type: ignore[assignment]
        if fabric is not None:
            self.state.loggers = list(getattr(fabric, "loggers", []))
        for technique in self.techniques:
            technique.on_fit_start(self.state, self.module)  # type: ignore[arg-type]
            technique.on_train_start(self.state, self.module)  # type: ignore[arg-type]
            technique.on_train_epoch_start(self.state, self.module)  # type: ignore[arg-type]
            technique.on_train_batch_start(self.state, self.module, None, 0)  # type: ignore[arg-type]
        self._hooks = [inner.register_step_pre_hook(self._before_step), inner.register_step_post_hook(self._after_step)]

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        for technique in self.techniques:
            technique.on_before_optimizer_step(self.state, self.module, optimizer)  # type: ignore[arg-type]

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        state = self.state
        state.global_step += 1
        batch = (state.global_step - 1) % state.num_training_batches
        for technique in self.techniques:
            technique.on_train_batch_end(state, self.module, None, None, batch)  # type: ignore[arg-type]
        if state.global_step % state.num_training_batches == 0:
            for technique in self.techniques:
                technique.on_train_epoch_end(state, self.module)  # type: ignore[arg-type]
                technique.on_train_epoch_start(state, self.module)  # type: ignore[arg-type]
        for technique in self.techniques:
            technique.on_train_batch_start(state, self.module, None, state.global_step)  # type: ignore[arg-type]

    def finish(self) -> None:
        """End training: a technique short of its target says so and, with ``finish_on_stop``, reaches it now (as at
        the end of a Trainer's fit); tables are written; the optimizer hooks are removed."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for technique in self.techniques:
            technique.on_train_end(self.state, self.module)  # type: ignore[arg-type]
        self.module._fabric = self._previous_fabric
