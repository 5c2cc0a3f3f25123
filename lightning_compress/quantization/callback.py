"""QuantizationAwareTraining: fake quantization of Conv/Linear layers as a Lightning callback.

A thin adapter: :func:`~lightning_compress.quantization.prepare.prepare_qat` puts the quantizers on the layers (the
Trainer-free form, with the same :class:`~lightning_compress.quantization.prepare.QATConfig`); the callback only
decides *when*, moving through the phases of training by optimizer step: float → observer calibration → fake
quantization → frozen observers / frozen BatchNorm statistics.
The numerics live in :mod:`~lightning_compress.core.quantizers`; the integer model is written by
:func:`~lightning_compress.export.onnx.export_onnx`.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.core.checks import check_number, comparable, parse_epoch, show_epoch
from lightning_compress.core.configs import ObserverName
from lightning_compress.core.quantizers import fake_quantize
from lightning_compress.quantization.prepare import (
    CHECKPOINT_QUANTIZERS,
    QATConfig,
    all_quantizers,
    folded_batchnorms,
    folded_weight_and_bias,
    prepare_qat,
    qat_state_dict,
    quantizer_entries,
)
from lightning_compress.quantization.ptq import calibrate_
from lightning_compress.trainer.progress import (
    check_optimizers,
    check_strategy,
    check_within_max_epochs,
    debug_setting,
    resolve_epochs,
    scheduled_epoch_steps,
    short_run,
    structure_ends,
    warn_if_spawned,
)
from lightning_compress.trainer.technique import Technique


class _SplitQuantizersOnSave:
    """A prepared model's ``on_save_checkpoint``: the module's own hook runs, then the quantizers' entries move from the
    checkpoint's ``state_dict`` to beside it (a class, not a closure, so that the model still pickles)."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module

    def __call__(self, checkpoint: dict[str, Any]) -> None:
        type(self.module).on_save_checkpoint(self.module, checkpoint)
        state = checkpoint.get("state_dict", {})
        entries = quantizer_entries(state)
        for key in entries:
            del state[key]
        checkpoint.setdefault(CHECKPOINT_QUANTIZERS, {}).update(entries)


class _MergeQuantizersOnLoad:
    """A prepared model's ``on_load_checkpoint``: the quantizers' entries a checkpoint keeps beside its ``state_dict``
    go back into it, then the module's own hook runs (a class, not a closure, so that the model still pickles:
    ``torch.save``, ``ddp_spawn``)."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module

    def __call__(self, checkpoint: dict[str, Any]) -> None:
        if CHECKPOINT_QUANTIZERS in checkpoint:
            checkpoint["state_dict"] = qat_state_dict(checkpoint)
        type(self.module).on_load_checkpoint(self.module, checkpoint)


class QuantizationAwareTraining(Technique):
    r"""Quantization-aware training (fake quantization) of a LightningModule's Conv and Linear layers.

    Weights are quantized per output channel (or per tensor), symmetric with zero-point 0 by default — so pruned
    zeros stay exactly zero; input activations per tensor, unsigned affine by default. Gradients pass straight
    through. Ranges come from moving-average min/max observers, or are learned (``observer="lsq"``, Esser et al.
    2020). Activation ranges move only in training steps, never in validation, test or predict; a weight's range is
    its current min/max, so it follows the weights (also when evaluated) until ``freeze_observers_epoch``.

    Phases, counted in optimizer steps (epochs may be fractional): float training before ``start_epoch``; then
    ``calibration_steps`` steps in which the observers watch without quantizing; then fake quantization. At
    ``freeze_observers_epoch`` the ranges freeze; at ``freeze_bn_epoch`` the BatchNorm statistics freeze. A Conv
    that feeds a BatchNorm is trained with the BatchNorm folded into its quantized weight (``fold_bn``), so that
    the exported integer model computes what was trained.

    Args:
        weight_bits: Bits of the weights, 2–8.
        activation_bits: Bits of the input activations, 2–8.
        per_channel: Weight scales per output channel (``True``) or per tensor.
        weight_symmetric: Symmetric weights with zero-point 0 (``True``) or affine.
        activation_symmetric: Signed symmetric activations, or unsigned affine (``False``, the default).
        observer: ``"minmax"`` or ``"lsq"`` (learned step sizes).
        start_epoch: Epoch (or share of training, e.g. ``"33%"``) at which quantization starts. ``None`` (default):
            when a technique that changes the structure is on the same Trainer (a :class:`MagnitudePruning` ramp; any
            callback with ``structure_final_epoch``), the epoch its structure is final (masks are final before ranges
            are observed, so pruned weights are exactly the integer zeros of the export), else 0. An explicit epoch
            before the ramp ends is allowed, with a warning.
        calibration_steps: Optimizer steps of observation before fake quantization starts.
        freeze_observers_epoch: Epoch (or share) at which ranges stop moving (``None``: never). Not before
            ``start_epoch``.
        freeze_bn_epoch: Epoch (or share) at which BatchNorm running statistics freeze (``None``: never).
        fold_bn: Fold a Conv's BatchNorm into its quantized weight.
        layer_bits: ``{pattern: bits}`` (weight bits) or ``{pattern: {"weight_bits": b, "activation_bits": b}}``
            per-layer overrides, e.g. ``{"@first": 8, "@last": 8}`` to keep the first and last layer at 8 bits while
            the rest use 4 (patterns: regular expressions or the selectors of :mod:`lightning_compress.core.selection`).
            A path reads that mapping from a YAML file, e.g. the ``layer_bits.yaml`` of a quantization sensitivity
            scan (``lightning-compress-sensitivity sensitivity.kind=quantization``, chosen under a bit budget).
        include: Regular expression(s) or selectors of the layers to quantize, as in MagnitudePruning.
        exclude: Regular expression(s) or selectors of layers to leave in float.
        averaging_constant: Weight of a new batch in the activation observers' moving average.
        log_every_n_steps: Optimizer steps between logs of the per-layer scales and clipping fractions.
        finish_on_stop: When training stops before the layers fake-quantize (EarlyStopping, ``max_time``,
            ``max_steps``), quantize at the end of fit (default): the ranges are calibrated in evaluation mode on up to
            ``calibration_steps`` training batches, as :func:`~lightning_compress.quantize_` does. ``False`` leaves
            the model in float. Either way a warning says so.
        quantize_outputs: Quantize, in the trained model itself, every tensor an integer kernel of ONNX Runtime reads
            or writes, once (:func:`~lightning_compress.quantization.prepare.quantization_plan`): each layer's output
            once it computes the folded integer model (unless only the next layers' input quantizers read it, through
            a ReLU at most), and the inputs and output of each residual addition of a layer's output, by a forward hook
            on the module that makes the tensor, shared as the input quantizer of the layers that read it. The export
            then runs as ``QLinearConv`` / ``QGemm`` / ``QLinearAdd`` — as ONNX Runtime's own ``quantize_static`` of
            the same network (``benchmarks/ort_latency.py``). Off: layer inputs only (the int8 file then ran slower
            than fp32 on a ResNet-20).
        activation_range: ``(low, high)`` of bounded input activations (the outputs of tanh: ``(-1, 1)``, of
            sigmoid: ``(0, 1)``): the grid spans it and nothing is observed. With it, ``activation_bits=1`` is the
            binary quantizer (the sign for ``(-1, 1)``). Per layer: ``layer_bits={regex: {"activation_bits": 2,
            "activation_range": (0, 1)}}``.

    Example::

        from lightning_compress import QuantizationAwareTraining, export_onnx

        trainer = pl.Trainer(max_epochs=10, callbacks=[QuantizationAwareTraining(start_epoch=2)])
        trainer.fit(model, datamodule)
        export_onnx(model, "model.int8.onnx", example_input)   # QDQ ONNX with int8 weights
    """

    holds = "quantizers"

    def __init__(
        self,
        weight_bits: int = 8,
        activation_bits: int = 8,
        per_channel: bool = True,
        weight_symmetric: bool = True,
        activation_symmetric: bool = False,
        observer: ObserverName = "minmax",
        start_epoch: float | str | None = None,
        calibration_steps: int = 20,
        freeze_observers_epoch: float | str | None = None,
        freeze_bn_epoch: float | str | None = None,
        fold_bn: bool = True,
        layer_bits: Mapping[str, int | Mapping[str, int]] | str | os.PathLike | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        averaging_constant: float = 0.01,
        log_every_n_steps: int = 50,
        finish_on_stop: bool = True,
        activation_range: Sequence[float] | None = None,
        quantize_outputs: bool = True,
    ) -> None:
        config = QATConfig(
            weight_bits=weight_bits, activation_bits=activation_bits, per_channel=per_channel,
            weight_symmetric=weight_symmetric, activation_symmetric=activation_symmetric, observer=observer,
            fold_bn=fold_bn, layer_bits=layer_bits, include=include, exclude=exclude,
            averaging_constant=averaging_constant, activation_range=activation_range, quantize_outputs=quantize_outputs,
        )  # fmt: skip
        # What prepare_qat puts on the layers (checked there); the callback adds only *when*.
        super().__init__(config, finish_on_stop)
        self.config: QATConfig = config
        self.start_epoch = parse_epoch("start_epoch", start_epoch, optional=True)
        self.freeze_observers_epoch = parse_epoch("freeze_observers_epoch", freeze_observers_epoch, optional=True)
        self.freeze_bn_epoch = parse_epoch("freeze_bn_epoch", freeze_bn_epoch, optional=True)
        start = self.start_epoch or 0.0
        if (keys := comparable(start, self.freeze_observers_epoch)) is not None:  # same unit: compare now
            self._check_freeze_after_start(*keys, "start_epoch", show_epoch(start))
        self.calibration_steps = check_number("calibration_steps", calibration_steps, 0, integer=True)
        self.log_every_n_steps = check_number("log_every_n_steps", log_every_n_steps, 1, integer=True)

        self._layers: dict[str, Any] = {}  # quantized Conv/Linear layers (their class is swapped at run time)
        self._quantizers: list[Any] = []  # every quantizer: the layers' and the tensor quantizers (residual additions)
        self._bns: list[nn.Module] = []
        self._phase = {"observing": False, "quantizing": False, "bn_frozen": False}
        self._steps: dict[str, int | None] = {}
        self._epochs: dict[str, float | None] = {}
        self._calibration = self.calibration_steps  # shortened in a run too short for it

    def _check_freeze_after_start(self, start: float, freeze: float | None, source: str, shown: str = "") -> None:
        if freeze is not None and freeze < start - 1e-9:
            raise ValueError(
                f"`freeze_observers_epoch` ({show_epoch(self.freeze_observers_epoch)}) is before the start of "
                f"quantization ({source} = {shown or f'{start:g}'}): the ranges would freeze before anything was "
                "observed."
            )

    def _resolve_start(self, trainer: pl.Trainer, epochs: dict[str, float | None]) -> float:
        """``start_epoch``, or by default the epoch at which every technique that changes the structure on the same
        Trainer (a MagnitudePruning ramp: see :class:`~lightning_compress.core.protocol.ChangesStructure`) is final,
        else 0."""
        ends = structure_ends(trainer, self)
        last = max(ends.values(), default=0.0)
        owners = ", ".join(n for n, e in ends.items() if e == last)
        start = epochs["start_epoch"]
        if start is None:
            self._check_freeze_after_start(
                last,
                epochs["freeze_observers_epoch"],
                f"the end of the {owners or 'pruning'} ramp, as start_epoch is None",
            )
            return last
        if ends and start < last:
            rank_zero_warn(
                f"QuantizationAwareTraining starts at epoch {start:g}, before the {owners} ramp ends (epoch "
                f"{last:g}): the masks still change while the ranges are observed. Leave start_epoch=None to start "
                "when the ramp ends."
            )
        self._check_freeze_after_start(start, epochs["freeze_observers_epoch"], "start_epoch")
        return start

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "QuantizationAwareTraining")
        if stage == "fit":
            self._epochs = resolve_epochs(trainer, "QuantizationAwareTraining", {
                "start_epoch": self.start_epoch, "freeze_observers_epoch": self.freeze_observers_epoch,
                "freeze_bn_epoch": self.freeze_bn_epoch,
            })  # fmt: skip
            if self.start_epoch is not None:
                self._check_freeze_after_start(self._epochs["start_epoch"] or 0.0,
                                               self._epochs["freeze_observers_epoch"], "start_epoch")  # fmt: skip
            if (start := self._epochs["start_epoch"]) is not None:
                why = "quantization would never start and the export would fail"
                check_within_max_epochs(trainer, self.name, "start_epoch", self.start_epoch, start, why, strict=True)
        if self._layers and self._bound_to(pl_module):
            return  # the same model again (another fit, or test after fit): its quantizers are in place
        if self._layers:  # this instance quantized another model before: start over on the new one
            self._phase = {"observing": False, "quantizing": False, "bn_frozen": False}
        self._layers = prepare_qat(pl_module, self.config)
        self._quantizers = all_quantizers(pl_module)
        self._split_checkpoints(pl_module)
        self._bind(pl_module)
        warn_if_spawned(trainer, self.name, self.holds)
        self._bns = folded_batchnorms(self._layers)
        # Outside fit (validate/test/predict on a restored checkpoint) the layers quantize as trained.
        self._set_phase(observing=False, quantizing=stage != "fit", bn_frozen=self._phase["bn_frozen"])

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_optimizers(trainer, pl_module, "QuantizationAwareTraining")
        start_epoch = self._resolve_start(trainer, self._epochs)
        per_epoch = scheduled_epoch_steps(trainer, self.name, f"its schedule (quantization from epoch {start_epoch:g})")

        def step(epoch: float | None) -> int | None:
            return None if epoch is None else round(epoch * per_epoch)

        self._steps = {
            "start": step(start_epoch),
            "freeze_observers": step(self._epochs["freeze_observers_epoch"]),
            "freeze_bn": step(self._epochs["freeze_bn_epoch"]),
        }
        self._calibration = self.calibration_steps
        total, start = trainer.estimated_stepping_batches, self._steps["start"] or 0
        if math.isfinite(total) and start + self._calibration >= total and trainer.global_step <= start:
            reason = short_run(trainer)
            if reason is None:
                raise ValueError(
                    f"QuantizationAwareTraining would never fake-quantize: it starts at optimizer step {start} and "
                    f"observes for calibration_steps={self.calibration_steps} more, but Trainer(max_epochs="
                    f"{trainer.max_epochs}) trains {int(total)} steps. Start earlier (start_epoch) or calibrate for "
                    "fewer steps."
                )
            # A short run still quantizes its last step(s): the whole path runs, the export works.
            self._calibration = max(0, int(total) - 1 - start)
            line = (
                f"{self.name}: {reason} leaves {max(0, int(total) - start)} optimizer step(s) after quantization "
                f"starts (step {start}), too few for calibration_steps={self.calibration_steps} and a quantized step: "
                f"calibrating for {self._calibration} step(s) instead."
            )
            (rank_zero_info if debug_setting(trainer) else rank_zero_warn)(line)
        if (frozen := self._steps["freeze_observers"]) is not None and frozen <= start:
            # The ranges are observed on one step at least (a short run compresses the freeze onto the start).
            self._steps["freeze_observers"] = start + 1

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        g, s = trainer.global_step, self._steps
        started = g >= s["start"]  # type: ignore[operator]
        frozen_obs = s["freeze_observers"] is not None and g >= s["freeze_observers"]
        frozen_bn = self._phase["bn_frozen"] or (s["freeze_bn"] is not None and g >= s["freeze_bn"])
        quantizing = started and g >= s["start"] + self._calibration  # type: ignore[operator]
        self._set_phase(observing=started and not frozen_obs, quantizing=quantizing, bn_frozen=frozen_bn)
        if frozen_bn:
            for bn in self._bns:
                bn.eval()  # Lightning puts the module back in train mode at every epoch start
        measure = quantizing and (g % self.log_every_n_steps == 0)
        for layer in self._layers.values():
            if (quantizer := getattr(layer, "input_quantizer", None)) is not None:  # an embedding's input is ids
                quantizer.measure_clipping = measure

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.world_size > 1 and self._phase["observing"]:
            self._sync_activation_ranges(trainer)
        if not self._phase["quantizing"]:
            return
        metrics = {}
        for name, layer in self._layers.items():
            clip = getattr(getattr(layer, "input_quantizer", None), "last_clip_fraction", None)
            if clip is not None and layer.input_quantizer.measure_clipping:
                metrics[f"qat/clip_fraction/{name}"] = clip
                metrics[f"qat/act_scale/{name}"] = float(layer.input_quantizer.qparams()[0].mean())
                metrics[f"qat/weight_scale/{name}"] = float(layer.weight_quantizer.qparams()[0].mean())
        if metrics:
            # Straight to the loggers: Lightning's self.log would drop them unless this step happened to be one of
            # the Trainer's own logging steps (every log_every_n_steps of its own).
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._phase["quantizing"]:
            pl_module.log_dict({f"qat/weight_error/{n}": e for n, e in self.weight_errors().items()}, on_epoch=True)

    @property
    @override
    def target_reached(self) -> bool:
        """Whether the layers are fake-quantized now (see :class:`CompressionTarget`)."""
        return bool(self._phase["quantizing"])

    @override
    def _goal(self) -> str:
        return "fake quantization"

    @override
    def _reached(self) -> str:
        if self._phase["quantizing"]:
            return "quantizing"
        return "calibrating (not quantizing yet)" if self._phase["observing"] else "float (not started)"

    @override
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        batches = list(itertools.islice(loader, max(1, self.calibration_steps))) if loader is not None else []
        calibrate_(pl_module, batches, self._quantizers)
        if trainer.world_size > 1:
            self._sync_activation_ranges(trainer)
        self._set_phase(observing=False, quantizing=True, bn_frozen=self._phase["bn_frozen"])

    def schedule_epochs(self) -> list[float]:
        """The epochs of the start (when given) and of the freezes (known after ``setup``); see
        :class:`~lightning_compress.core.protocol.HasSchedule`."""
        return [e for e in self._epochs.values() if e is not None]

    @override
    def state_dict(self) -> dict[str, Any]:
        return dict(self._phase)

    # ------------------------------------------------------------------ checkpoints: the float model's state_dict
    def _split_checkpoints(self, pl_module: pl.LightningModule) -> None:
        """A checkpoint's ``state_dict`` stays the float model's (``MyModel.load_from_checkpoint`` loads the user's
        plain class, with the trained weights): when Lightning saves one (``save_weights_only`` too), the quantizers'
        entries go beside it (:data:`CHECKPOINT_QUANTIZERS`); before it loads one into the prepared model (resume,
        ``validate`` / ``test`` / ``predict`` with ``ckpt_path``: the module's ``on_load_checkpoint`` comes first in
        every stage) they go back in, so the strict load restores the ranges too."""
        if not isinstance(pl_module.__dict__.get("on_save_checkpoint"), _SplitQuantizersOnSave):
            pl_module.on_save_checkpoint = _SplitQuantizersOnSave(pl_module)  # type: ignore[method-assign]
            pl_module.on_load_checkpoint = _MergeQuantizersOnLoad(pl_module)  # type: ignore[method-assign]

    @override
    def _restore_from(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: str | os.PathLike, state: dict[str, Any]
    ) -> None:
        """Put the quantizers back on ``pl_module`` and load the checkpoint strictly: weights, scales, observed ranges,
        and the phase (Lightning copies only the weights back from spawned processes, dropping the quantizers)."""
        self._layers = {}
        self.setup(trainer, pl_module, "validate")
        pl_module.load_state_dict(qat_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)))
        self.load_state_dict(state)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._set_phase(
            observing=bool(state_dict.get("observing", False)),
            quantizing=bool(state_dict.get("quantizing", True)),
            bn_frozen=bool(state_dict.get("bn_frozen", False)),
        )

    # ------------------------------------------------------------------ internals
    def _set_phase(self, observing: bool, quantizing: bool, bn_frozen: bool) -> None:
        self._phase = {"observing": observing, "quantizing": quantizing, "bn_frozen": bn_frozen}
        for q in self._quantizers:
            q.observing, q.quantizing = observing, quantizing

    @torch.no_grad()
    def _sync_activation_ranges(self, trainer: pl.Trainer) -> None:
        # Every rank observes its own batches; averaging the ranges after each step keeps the quantization
        # parameters identical on every rank (weights' ranges already are: DDP keeps the weights identical).
        quantizers = [q for q in self._quantizers if not q.is_weight and q.initialized and q.fixed_range is None]
        if not quantizers:
            return
        flat = torch.cat([torch.cat([q.min_val, q.max_val]) for q in quantizers])
        flat = trainer.strategy.reduce(flat, reduce_op="mean")
        offset = 0
        for q in quantizers:
            n = q.min_val.numel()
            q.min_val.copy_(flat[offset : offset + n])
            q.max_val.copy_(flat[offset + n : offset + 2 * n])
            if q.observer == "minmax":  # a learned scale is a parameter: DDP keeps it identical already
                q.refresh_qparams()
            offset += 2 * n

    # ------------------------------------------------------------------ read-outs
    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Within the block the layers compute in float (same weights, BatchNorm folding undone exactly)."""
        previous = dict(self._phase)
        self._set_phase(observing=False, quantizing=False, bn_frozen=previous["bn_frozen"])
        try:
            yield
        finally:
            self._set_phase(**previous)

    @property
    def layers(self) -> dict[str, Any]:
        """The quantized layers, name → module (known after ``setup``)."""
        return dict(self._layers)

    @torch.no_grad()
    def weight_errors(self) -> dict[str, float]:
        """Relative weight quantization error ‖fq(w) − w‖ / ‖w‖ of every layer (BatchNorm folded in)."""
        out = {}
        for name, layer in self._layers.items():
            weight, _ = folded_weight_and_bias(layer)
            scale, zero_point = layer.weight_quantizer.qparams()
            err = fake_quantize(weight, scale, zero_point, layer.weight_quantizer.spec) - weight
            out[name] = float(err.norm() / weight.norm().clamp_min(1e-12))
        return out
