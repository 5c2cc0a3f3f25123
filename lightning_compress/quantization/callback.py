"""QuantizationAwareTraining: fake quantization of Conv/Linear layers as a Lightning callback.

The callback selects the layers (the same include/exclude mechanism as MagnitudePruning), puts quantizers on
them (:mod:`~lightning_compress.quantization.attach`) and moves through the phases of training by optimizer
step: float → observer calibration → fake quantization → frozen observers / frozen BatchNorm statistics.
The numerics live in :mod:`~lightning_compress.quantization.quantizers`; the integer model is written by
:func:`~lightning_compress.quantization.export.export_onnx`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.quantization.attach import attach, find_conv_bn_pairs
from lightning_compress.quantization.quantizers import FakeQuantizer, QuantSpec, check_bits, fake_quantize
from lightning_compress.selection import check_overrides_match, match_overrides, select_modules
from lightning_compress.training import check_epoch, optimizer_steps_per_epoch

OBSERVERS = ("minmax", "lsq")


class QuantizationAwareTraining(Callback):
    r"""Quantization-aware training (fake quantization) of a LightningModule's Conv and Linear layers.

    Weights are quantized per output channel (or per tensor), symmetric with zero-point 0 by default — so pruned
    zeros stay exactly zero; input activations per tensor, unsigned affine by default. Gradients pass straight
    through. Ranges come from moving-average min/max observers, or are learned (``observer="lsq"``, Esser et al.
    2020). Observers move only in training steps, never in validation, test or predict.

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
        start_epoch: Epoch at which quantization starts. ``None`` (default): when a :class:`MagnitudePruning` is on
            the same Trainer, the end of its ramp (masks are final before ranges are observed, so pruned weights are
            exactly the integer zeros of the export), else 0. An explicit epoch before the ramp ends is allowed, with
            a warning.
        calibration_steps: Optimizer steps of observation before fake quantization starts.
        freeze_observers_epoch: Epoch at which ranges stop moving (``None``: never). Not before ``start_epoch``.
        freeze_bn_epoch: Epoch at which BatchNorm running statistics freeze (``None``: never).
        fold_bn: Fold a Conv's BatchNorm into its quantized weight.
        layer_bits: ``{regex: bits}`` (weight bits) or ``{regex: {"weight_bits": b, "activation_bits": b}}`` per-layer
            overrides, e.g. ``{"features\\.0$": 8}`` to keep the first layer at 8 bits while the rest use 4.
        include: Regular expression(s) selecting layers, as in MagnitudePruning.
        exclude: Regular expression(s) of layers to leave in float.
        averaging_constant: Weight of a new batch in the activation observers' moving average.
        log_every_n_steps: Optimizer steps between logs of the per-layer scales and clipping fractions.
        quantize_outputs: Also quantize each layer's output (per tensor, like its input) once the layer computes the
            folded integer model (BatchNorm frozen or absent). The export then puts QuantizeLinear/DequantizeLinear
            after the layer too — the pattern ONNX Runtime turns into integer kernels (QLinearConv) everywhere,
            including convolutions that feed residual additions.
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

    def __init__(
        self,
        weight_bits: int = 8,
        activation_bits: int = 8,
        per_channel: bool = True,
        weight_symmetric: bool = True,
        activation_symmetric: bool = False,
        observer: str = "minmax",
        start_epoch: float | None = None,
        calibration_steps: int = 20,
        freeze_observers_epoch: float | None = None,
        freeze_bn_epoch: float | None = None,
        fold_bn: bool = True,
        layer_bits: Mapping[str, int | Mapping[str, int]] | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        averaging_constant: float = 0.01,
        log_every_n_steps: int = 50,
        activation_range: Sequence[float] | None = None,
        quantize_outputs: bool = False,
    ) -> None:
        super().__init__()
        self.weight_bits = check_bits("weight_bits", weight_bits)
        self.activation_range = self._check_range("activation_range", activation_range)
        self.activation_bits = self._check_activation_bits("activation_bits", activation_bits, self.activation_range)
        if observer not in OBSERVERS:
            raise ValueError(f"`observer` must be one of {OBSERVERS}, got {observer!r}.")
        self.observer = observer
        self.per_channel, self.weight_symmetric = bool(per_channel), bool(weight_symmetric)
        self.activation_symmetric, self.fold_bn = bool(activation_symmetric), bool(fold_bn)
        self.start_epoch = None if start_epoch is None else check_epoch("start_epoch", start_epoch)
        self.freeze_observers_epoch = (
            None if freeze_observers_epoch is None else check_epoch("freeze_observers_epoch", freeze_observers_epoch)
        )
        self.freeze_bn_epoch = None if freeze_bn_epoch is None else check_epoch("freeze_bn_epoch", freeze_bn_epoch)
        self._check_freeze_after_start(self.start_epoch or 0.0, "start_epoch")
        if isinstance(calibration_steps, bool) or not isinstance(calibration_steps, int) or calibration_steps < 0:
            raise ValueError(f"`calibration_steps` must be an integer >= 0, got {calibration_steps!r}.")
        self.calibration_steps = calibration_steps
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"`averaging_constant` must be in (0, 1], got {averaging_constant!r}.")
        self.averaging_constant = float(averaging_constant)
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"`log_every_n_steps` must be an integer >= 1, got {log_every_n_steps!r}.")
        self.log_every_n_steps = log_every_n_steps
        self.layer_bits = {str(p): self._parse_override(p, v) for p, v in dict(layer_bits or {}).items()}
        self.include, self.exclude = include, exclude
        self.quantize_outputs = bool(quantize_outputs)

        self._layers: dict[str, Any] = {}  # quantized Conv/Linear layers (their class is swapped at run time)
        self._bns: list[nn.Module] = []
        self._phase = {"observing": False, "quantizing": False, "bn_frozen": False}
        self._steps: dict[str, int | None] = {}

    @staticmethod
    def _check_range(name: str, value: Any) -> tuple[float, float] | None:
        if value is None:
            return None
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"`{name}` must be a pair (low, high), e.g. (-1, 1) after tanh; got {value!r}.") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"`{name}` must be finite with low < high, got {value!r}.")
        return lo, hi

    @staticmethod
    def _check_activation_bits(name: str, bits: Any, fixed_range: tuple[float, float] | None) -> int:
        if bits == 1 and not isinstance(bits, bool) and fixed_range is None:
            raise ValueError(
                f"`{name}`=1 is the binary quantizer for bounded activations and needs `activation_range` "
                "(e.g. (-1, 1) after tanh, (0, 1) after sigmoid); otherwise use 2 to 8 bits."
            )
        return check_bits(name, bits, low=1 if fixed_range is not None else 2)

    def _parse_override(self, pattern: str, value: Any) -> dict[str, Any]:
        where = f"layer_bits[{pattern!r}]"
        if not isinstance(value, Mapping):
            return {"weight_bits": check_bits(where, value)}
        unknown = set(value) - {"weight_bits", "activation_bits", "activation_range"}
        if unknown:
            raise ValueError(
                f"`{where}` keys must be 'weight_bits' / 'activation_bits' / 'activation_range', got {sorted(unknown)}."
            )
        out: dict[str, Any] = {}
        if "activation_range" in value:
            out["activation_range"] = self._check_range(f"{where}['activation_range']", value["activation_range"])
        if "weight_bits" in value:
            out["weight_bits"] = check_bits(f"{where}['weight_bits']", value["weight_bits"])
        if "activation_bits" in value:
            fixed = out.get("activation_range", self.activation_range)
            out["activation_bits"] = self._check_activation_bits(
                f"{where}['activation_bits']", value["activation_bits"], fixed
            )
        return out

    def _check_freeze_after_start(self, start: float, source: str) -> None:
        if self.freeze_observers_epoch is not None and self.freeze_observers_epoch < start:
            raise ValueError(
                f"`freeze_observers_epoch` ({self.freeze_observers_epoch:g}) is before the start of quantization "
                f"({source} = {start:g}): the ranges would freeze before anything was observed."
            )

    def _resolve_start(self, trainer: pl.Trainer) -> float:
        """``start_epoch``, or by default the end of a MagnitudePruning ramp on the same Trainer (else 0)."""
        from lightning_compress.pruning import MagnitudePruning

        ramps = [cb.end_epoch for cb in trainer.callbacks if isinstance(cb, MagnitudePruning)]  # type: ignore[attr-defined]
        if self.start_epoch is None:
            start = max(ramps, default=0.0)
            self._check_freeze_after_start(start, "the end of the MagnitudePruning ramp, as start_epoch is None")
            return start
        if ramps and self.start_epoch < max(ramps):
            rank_zero_warn(
                f"QuantizationAwareTraining starts at epoch {self.start_epoch:g}, before the MagnitudePruning ramp "
                f"ends (epoch {max(ramps):g}): the masks still change while the ranges are observed. Leave "
                "start_epoch=None to start when the ramp ends."
            )
        return self.start_epoch

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._layers:
            return
        selected = select_modules(pl_module, self.include, self.exclude)
        names = [n for n, _ in selected]
        check_overrides_match(names, self.layer_bits, "layer_bits")
        pairs = find_conv_bn_pairs(pl_module, names) if self.fold_bn else {}
        modules = dict(pl_module.named_modules())
        for name, layer in selected:
            weight: Any = layer.weight
            if self.per_channel and weight.dim() < 2:
                raise ValueError(f"per_channel=True needs a channel axis, but layer {name!r} has a 1-D weight.")
            bits: dict[str, Any] = {
                "weight_bits": self.weight_bits,
                "activation_bits": self.activation_bits,
                "activation_range": self.activation_range,
            }
            bits.update(match_overrides(name, self.layer_bits) or {})  # type: ignore[arg-type]
            w_spec = QuantSpec(bits["weight_bits"], self.weight_symmetric, self.per_channel, axis=0)
            fixed = bits["activation_range"]
            a_spec = QuantSpec(bits["activation_bits"], self.activation_symmetric and fixed is None, per_channel=False)
            input_quantizer = FakeQuantizer(
                a_spec,
                "minmax" if fixed is not None else self.observer,  # a fixed range is not learned
                averaging_constant=self.averaging_constant,
                fixed_range=fixed,
            )
            bn = modules[pairs[name]] if name in pairs else None
            attach(
                layer,
                FakeQuantizer(w_spec, self.observer, channels=weight.shape[0], weight=True).to(weight.device),
                input_quantizer.to(weight.device),
                bn,
                FakeQuantizer(
                    QuantSpec(self.activation_bits if self.activation_range is None else 8, self.activation_symmetric),
                    self.observer,
                    averaging_constant=self.averaging_constant,
                ).to(weight.device)
                if self.quantize_outputs
                else None,
            )
            if bn is not None:
                self._bns.append(bn)
        self._layers = dict(selected)
        # Outside fit (validate/test/predict on a restored checkpoint) the layers quantize as trained.
        self._set_phase(observing=False, quantizing=stage != "fit", bn_frozen=self._phase["bn_frozen"])

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        per_epoch = optimizer_steps_per_epoch(trainer, "QuantizationAwareTraining")

        def step(epoch: float | None) -> int | None:
            return None if epoch is None else round(epoch * per_epoch)

        self._steps = {
            "start": step(self._resolve_start(trainer)),
            "freeze_observers": step(self.freeze_observers_epoch),
            "freeze_bn": step(self.freeze_bn_epoch),
        }

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        g, s = trainer.global_step, self._steps
        started = g >= s["start"]  # type: ignore[operator]
        frozen_obs = s["freeze_observers"] is not None and g >= s["freeze_observers"]
        frozen_bn = self._phase["bn_frozen"] or (s["freeze_bn"] is not None and g >= s["freeze_bn"])
        quantizing = started and g >= s["start"] + self.calibration_steps  # type: ignore[operator]
        self._set_phase(observing=started and not frozen_obs, quantizing=quantizing, bn_frozen=frozen_bn)
        if frozen_bn:
            for bn in self._bns:
                bn.eval()  # Lightning puts the module back in train mode at every epoch start
        measure = quantizing and (g % self.log_every_n_steps == 0)
        for layer in self._layers.values():
            layer.input_quantizer.measure_clipping = measure

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
            clip = getattr(layer.input_quantizer, "last_clip_fraction", None)
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
    def target_reached(self) -> bool:
        """Whether the layers are fake-quantized now (see :class:`CompressionTarget`)."""
        return bool(self._phase["quantizing"])

    @override
    def state_dict(self) -> dict[str, Any]:
        return dict(self._phase)

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
        for layer in self._layers.values():
            for q in (layer.input_quantizer, layer.weight_quantizer, getattr(layer, "output_quantizer", None)):
                if q is not None:
                    q.observing, q.quantizing = observing, quantizing

    @torch.no_grad()
    def _sync_activation_ranges(self, trainer: pl.Trainer) -> None:
        # Every rank observes its own batches; averaging the ranges after each step keeps the quantization
        # parameters identical on every rank (weights' ranges already are: DDP keeps the weights identical).
        quantizers = [
            q
            for layer in self._layers.values()
            for q in (layer.input_quantizer, getattr(layer, "output_quantizer", None))
            if q is not None and q.initialized and q.fixed_range is None
        ]
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
        from lightning_compress.quantization.attach import folded_weight_and_bias

        out = {}
        for name, layer in self._layers.items():
            weight, _ = folded_weight_and_bias(layer)
            scale, zero_point = layer.weight_quantizer.qparams()
            err = fake_quantize(weight, scale, zero_point, layer.weight_quantizer.spec) - weight
            out[name] = float(err.norm() / weight.norm().clamp_min(1e-12))
        return out
