"""QuantizationAwareTraining and the int8 ONNX export in real Trainer runs on digits."""

from __future__ import annotations

import copy
import csv

import lightning.pytorch as pl
import numpy as np
import onnx
import pytest
import torch
from conftest import assert_same_on_every_rank, make_trainer, ort_optimized_kernels, small_module
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_compress import MagnitudePruning, QuantizationAwareTraining, export_onnx, onnx_parity
from lightning_compress.export.onnx import PARITY_GOAL, pruned_zeros_kept
from lightning_compress.quantization.prepare import (
    all_quantizers,
    detach,
    float_state_dict,
    qat_state_dict,
    quantized_layers,
    unprepare,
)
from lightning_compress.tasks import ClassificationModule, DigitsDataModule, ResNet20


def fit(tmp_path, callbacks, module=None, **kwargs):
    module = module or small_module()
    dm = DigitsDataModule(seed=0)
    trainer = make_trainer(tmp_path, callbacks=callbacks, **kwargs)
    trainer.fit(module, dm)
    return trainer, module, dm


def onnx_logit_differences(module, path, loader):
    """Each sample's largest absolute logit difference between ONNX Runtime and the fake-quantized model."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    module.eval()
    out = []
    with torch.no_grad():
        for x, _ in loader:
            onnx_logits = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
            out.append((onnx_logits - module(x)).abs().amax(1))
    return torch.cat(out)


def test_qat_int8_on_digits_keeps_accuracy_and_exports_with_parity(tmp_path):
    pl.seed_everything(0)
    qat = QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=4, freeze_observers_epoch=5)
    trainer, module, dm = fit(tmp_path, [qat], module=small_module(width=32, hidden=128), max_epochs=6)
    accuracy = trainer.test(module, dm, verbose=False)[0]["test/acc"]
    assert accuracy > 0.93
    assert set(quantized_layers(module)) == {
        "net.features.0",
        "net.features.3",
        "net.features.7",
        "net.classifier.1",
        "net.classifier.3",
    }
    path = export_onnx(module, tmp_path / "m.onnx", next(iter(dm.test_dataloader()))[0])
    parity = onnx_parity(module, path, dm.test_dataloader())
    assert parity["top1_agreement"] >= PARITY_GOAL and parity["samples"] == 360
    # BatchNorm frozen: PyTorch computes the folded integer model itself, up to rounding ties. ONNX Runtime requantizes
    # a conv's int32 sums straight onto the next layer's input grid (QLinearConv -> QLinearConv), PyTorch rounds a
    # float sum: a tie may round the other way. The logits are then one step of their own grid apart, on few samples:
    # how many depends on the CPU's integer kernels (under 1 % where this was written, 6 of 360 — each exactly one step
    # — on an AVX512-VNNI EPYC with ONNX Runtime 1.32). More than one step, anywhere, is a wrong export.
    logit_step = float(module.net.classifier[3].output_quantizer.qparams()[0])
    differs = onnx_logit_differences(module, path, dm.test_dataloader())
    assert differs.max() <= logit_step * 1.001 and (differs > 1e-6).float().mean() <= 0.02
    assert abs(parity["accuracy_onnx"] - accuracy) <= 1 / 360 + 1e-9
    # int8 initializers instead of float weights; about a quarter of the float export
    proto = onnx.load(path)
    inits = {i.name: i for i in proto.graph.initializer}
    for layer in quantized_layers(module):
        assert inits[f"{layer}.weight_quantized"].data_type == onnx.TensorProto.INT8
        assert f"{layer}.weight" not in inits
    float_net = copy.deepcopy(module.net).eval()
    for layer in quantized_layers(float_net).values():
        detach(layer)
    float_path = tmp_path / "float.onnx"
    torch.onnx.export(float_net, (torch.zeros(1, 1, 8, 8),), float_path, dynamo=True)
    float_bytes = sum(p.stat().st_size for p in tmp_path.glob("float.onnx*"))  # graph + external weights
    assert path.stat().st_size < 0.3 * float_bytes


class RecordRanges(Callback):
    """Snapshots of every activation range around validation and after each step."""

    def __init__(self):
        self.before_val, self.after_val, self.per_step = [], [], []

    @staticmethod
    def ranges(pl_module):
        return torch.cat(
            [
                torch.cat([m.input_quantizer.min_val, m.input_quantizer.max_val])
                for m in quantized_layers(pl_module).values()
            ]
        ).clone()

    def on_validation_epoch_start(self, trainer, pl_module):
        self.before_val.append(self.ranges(pl_module))

    def on_validation_epoch_end(self, trainer, pl_module):
        self.after_val.append(self.ranges(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bn = pl_module.net.features[1]
        self.per_step.append((trainer.global_step, self.ranges(pl_module), bn.running_mean.clone()))


def test_phases_and_observers_never_move_outside_training_steps(tmp_path):
    pl.seed_everything(0)
    qat = QuantizationAwareTraining(start_epoch=1, calibration_steps=5, freeze_observers_epoch=2, freeze_bn_epoch=3)
    rec = RecordRanges()
    trainer, module, dm = fit(tmp_path, [qat, rec], max_epochs=4, limit_val_batches=2)
    for before, after in zip(rec.before_val, rec.after_val, strict=True):
        assert torch.equal(before, after) or torch.isinf(before).all()
    per_epoch = trainer.num_training_batches
    steps = {g: (r, m) for g, r, m in rec.per_step}
    assert torch.isinf(steps[per_epoch][0]).all()  # float training: nothing observed before start_epoch
    assert torch.isfinite(steps[per_epoch + 1][0]).all()
    frozen = [r for g, (r, _) in steps.items() if g > 2 * per_epoch]
    assert all(torch.equal(frozen[0], r) for r in frozen)  # observers frozen from epoch 2
    bn_frozen = [m for g, (_, m) in steps.items() if g > 3 * per_epoch]
    assert all(torch.equal(bn_frozen[0], m) for m in bn_frozen)  # BatchNorm statistics frozen from epoch 3
    before = module.net.features[1].running_mean.clone()
    ranges = RecordRanges.ranges(module)
    trainer.test(module, dm, verbose=False)
    trainer.validate(module, dm, verbose=False)
    assert torch.equal(RecordRanges.ranges(module), ranges) and torch.equal(module.net.features[1].running_mean, before)


def test_disabled_qat_trains_exactly_like_the_plain_module(tmp_path):
    pl.seed_everything(0)
    plain = small_module()
    quantized = copy.deepcopy(plain)

    class StopAfterTwoEpochs(pl.Callback):  # QAT starts at epoch 2 of 4; both runs stop before it does
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch >= 1

    pl.seed_everything(1)
    fit(tmp_path / "a", [StopAfterTwoEpochs()], module=plain, max_epochs=4)
    pl.seed_everything(1)
    fit(
        tmp_path / "b", [QuantizationAwareTraining(start_epoch=2), StopAfterTwoEpochs()], module=quantized, max_epochs=4
    )
    state = {k: v for k, v in quantized.state_dict().items() if "_quantizer." not in k}
    assert state.keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_qat_with_pruning_keeps_zeros_through_export(tmp_path):
    pl.seed_everything(0)
    pruning = MagnitudePruning(final_sparsity=0.8, end_epoch=2)
    qat = QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=3)
    trainer, module, dm = fit(tmp_path, [pruning, qat], max_epochs=4)
    path = export_onnx(module, tmp_path / "m.onnx", torch.zeros(2, 1, 8, 8))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    for name, mask in pruning.masks.items():
        ints = inits[f"{name}.weight_quantized"]
        assert np.array_equal(ints == 0, ~mask.numpy()), name  # pruned ↔ integer zero
    zeros = sum(int((inits[f"{n}.weight_quantized"] == 0).sum()) for n in pruning.masks)
    total = sum(m.numel() for m in pruning.masks.values())
    assert zeros == round(0.8 * total)
    # the app's check: every pruned weight is an integer zero in the file; a mask that disagrees is caught
    assert pruned_zeros_kept(path, pruning.masks) == 1.0
    name, mask = next(iter(pruning.masks.items()))
    assert pruned_zeros_kept(path, {name: torch.zeros_like(mask)}) < 1.0  # "everything pruned": not so in the file
    with pytest.raises(ValueError, match="no quantized weight for the pruned layer 'net.nope'"):
        pruned_zeros_kept(path, {"net.nope": mask})
    assert onnx_parity(module, path, dm.test_dataloader())["top1_agreement"] >= PARITY_GOAL


def test_by_default_quantization_starts_when_the_pruning_ramp_ends(tmp_path):
    pruning = MagnitudePruning(final_sparsity=0.8, end_epoch=2)
    qat = QuantizationAwareTraining(calibration_steps=0)  # start_epoch=None
    trainer, module, dm = fit(tmp_path, [pruning, qat], max_epochs=3)
    steps_per_epoch = trainer.global_step // 3
    assert qat._steps["start"] == 2 * steps_per_epoch == pruning._end_step
    # alone, it starts at once
    alone = QuantizationAwareTraining(calibration_steps=0)
    fit(tmp_path / "alone", [alone], max_epochs=1)
    assert alone._steps["start"] == 0


def test_quantization_before_the_ramp_ends_warns_and_a_too_early_freeze_is_refused(tmp_path):
    with pytest.warns(UserWarning, match=r"starts at epoch 1, before the MagnitudePruning ramp ends \(epoch 2\)"):
        fit(
            tmp_path,
            [MagnitudePruning(end_epoch=2), QuantizationAwareTraining(start_epoch=1, calibration_steps=5)],
            max_epochs=2,
        )
    qat = QuantizationAwareTraining(freeze_observers_epoch=1)  # fine alone, too early after a ramp to epoch 2
    with pytest.raises(
        ValueError, match=r"`freeze_observers_epoch` \(1\) is before the start of quantization \(the end"
    ):
        fit(tmp_path / "b", [MagnitudePruning(end_epoch=2), qat], max_epochs=3)


def test_four_bit_weights_and_activations_export_with_parity(tmp_path):
    pl.seed_everything(0)
    qat = QuantizationAwareTraining(
        weight_bits=4, activation_bits=4, layer_bits={r"features\.0$": 8}, start_epoch=1, quantize_outputs=False
    )  # inputs only: one Clip per 4-bit input
    trainer, module, dm = fit(tmp_path, [qat], max_epochs=4)
    path = export_onnx(module, tmp_path / "m.onnx", torch.zeros(2, 1, 8, 8))
    proto = onnx.load(path)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert np.abs(inits["net.features.3.weight_quantized"]).max() <= 7
    assert np.abs(inits["net.features.0.weight_quantized"]).max() > 7  # the 8-bit override
    assert sum(n.op_type == "Clip" for n in proto.graph.node) == 5  # 4-bit activations are clipped to their grid
    assert onnx_parity(module, path, dm.test_dataloader())["top1_agreement"] >= PARITY_GOAL


def test_lsq_trains_and_exports(tmp_path):
    pl.seed_everything(0)
    qat = QuantizationAwareTraining(
        weight_bits=2, observer="lsq", layer_bits={r"features\.0$|classifier\.3$": 8}, start_epoch=1
    )
    trainer, module, dm = fit(tmp_path, [qat], max_epochs=4)
    scale = module.net.features[3].weight_quantizer.scale
    assert isinstance(scale, nn.Parameter) and any(scale is p for p in trainer.optimizers[0].param_groups[0]["params"])
    path = export_onnx(module, tmp_path / "m.onnx", torch.zeros(2, 1, 8, 8))
    assert onnx_parity(module, path, dm.test_dataloader())["top1_agreement"] >= PARITY_GOAL


def test_resume_equals_uninterrupted_and_test_from_checkpoint(tmp_path):
    def callbacks():
        return [
            QuantizationAwareTraining(start_epoch=1, calibration_steps=3, freeze_bn_epoch=3, freeze_observers_epoch=3)
        ]

    pl.seed_everything(0)
    full = small_module()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    trainer, full, dm = fit(
        tmp_path / "full", [*callbacks(), ckpt], module=full, max_epochs=4, enable_checkpointing=True
    )
    pl.seed_everything(123)
    resumed = small_module()
    trainer2 = make_trainer(tmp_path / "resumed", callbacks=callbacks(), max_epochs=4)
    trainer2.fit(resumed, DigitsDataModule(seed=0), ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    # Trainer.test(ckpt_path=...) into a fresh module and callback: the quantized model as trained
    expected = trainer.test(full, dm, verbose=False)[0]["test/acc"]
    fresh = small_module()
    tester = make_trainer(tmp_path / "test", callbacks=callbacks())
    got = tester.test(fresh, DigitsDataModule(seed=0), ckpt_path=tmp_path / "ckpt" / "epoch=3.ckpt", verbose=False)
    assert got[0]["test/acc"] == pytest.approx(expected)
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=3.ckpt", weights_only=True)
    assert qat_state_dict(checkpoint).keys() == full.state_dict().keys()  # the quantizers travel beside state_dict
    assert checkpoint["state_dict"].keys() == float_state_dict(full.state_dict()).keys()  # the float model's


def test_logs_scales_clipping_and_weight_error(tmp_path):
    pl.seed_everything(0)
    logger = CSVLogger(tmp_path, name="csv")
    trainer, _, _ = fit(
        tmp_path,
        [QuantizationAwareTraining(start_epoch=0, calibration_steps=2, log_every_n_steps=5)],
        max_epochs=2,
        logger=logger,
        log_every_n_steps=7,  # the Trainer's own cadence does not decide when the QAT figures are logged
    )
    with open(logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    for kind in ("clip_fraction", "act_scale", "weight_scale", "weight_error"):
        assert f"qat/{kind}/net.features.3" in columns, kind
    steps = [int(r["step"]) for r in rows if r.get("qat/act_scale/net.features.3")]
    assert steps and all(step % 5 == 1 for step in steps)  # logged after the optimizer step of every 5th batch
    assert len(steps) == len([g for g in range(2, trainer.global_step) if g % 5 == 0])  # each, once quantizing
    clip = [float(r["qat/clip_fraction/net.features.3"]) for r in rows if r.get("qat/clip_fraction/net.features.3")]
    error = [float(r["qat/weight_error/net.features.3"]) for r in rows if r.get("qat/weight_error/net.features.3")]
    assert clip and all(0 <= c <= 1 for c in clip) and error and 0 < error[-1] < 0.05


def test_detach_restores_the_plain_layer():
    module = small_module()
    before = copy.deepcopy(module.state_dict())
    qat = QuantizationAwareTraining()
    qat.setup(make_trainer(".", max_epochs=1), module, "fit")
    for layer in quantized_layers(module).values():
        detach(layer)
    assert not quantized_layers(module)
    unprepare(module)  # the tensor quantizers too (the ReLUs before the pooling and the flatten host one each)
    assert module.state_dict().keys() == before.keys()
    assert type(module.net.features[0]) is nn.Conv2d


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(weight_bits=1), r"`weight_bits` must be an integer from 2 to 8, got 1"),
        (dict(weight_bits=16), r"`weight_bits` must be an integer from 2 to 8, got 16"),
        (dict(activation_bits=4.5), r"`activation_bits` must be an integer from 2 to 8, got 4.5"),
        (dict(observer="percentile"), r"`observer` must be one of \('minmax', 'lsq'\), got 'percentile'"),
        (
            dict(start_epoch=3, freeze_observers_epoch=2),
            r"`freeze_observers_epoch` \(2\) is before the start of quantization \(start_epoch = 3\)",
        ),
        (dict(start_epoch=-1), r"`start_epoch` must be a number of epochs >= 0"),
        (dict(layer_bits={"fc": 9}), r"`layer_bits\['fc'\]` must be an integer from 2 to 8, got 9"),
        (dict(layer_bits={"fc": {"bits": 4}}), r"`layer_bits\['fc'\]` keys must be 'weight_bits' / 'activation_bits'"),
        (dict(calibration_steps=-1), r"`calibration_steps` must be an integer >= 0, got -1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**kwargs)


def test_bad_setup_refused_before_training(tmp_path):
    class OneDim(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(64, 1)
            self.head.weight = nn.Parameter(torch.ones(64))  # 1-D: no channel axis

        def forward(self, x):
            return x.flatten(1) @ self.head.weight[:, None].expand(64, 10)

    for module, cb, message in [
        (
            ClassificationModule(OneDim()),
            QuantizationAwareTraining(),
            r"per_channel=True needs a channel axis, but layer 'net.head' has a 1-D weight",
        ),
        (small_module(), QuantizationAwareTraining(include="decoder"), r"`include` pattern 'decoder' matches no"),
        (
            small_module(),
            QuantizationAwareTraining(layer_bits={"decoder": 4}),
            r"`layer_bits` pattern 'decoder' matches no selected layer",
        ),
    ]:
        trainer = make_trainer(tmp_path, callbacks=[cb], max_epochs=1)
        with pytest.raises(ValueError, match=message):
            trainer.fit(module, DigitsDataModule())
        assert trainer.global_step == 0


def test_export_errors_are_one_line(tmp_path):
    module = small_module()
    with pytest.raises(ValueError, match=r"^export_onnx: the model has no quantized layers"):
        export_onnx(module, tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8))
    QuantizationAwareTraining().setup(make_trainer(tmp_path, max_epochs=1), module, "fit")
    with pytest.raises(ValueError, match=r"^export_onnx: no quantized training step has run yet"):
        export_onnx(module, tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8))
    pl.seed_everything(0)
    trainer, module, _ = fit(
        tmp_path, [QuantizationAwareTraining(calibration_steps=2)], max_epochs=1, limit_train_batches=4
    )
    with pytest.raises(ValueError) as info:
        export_onnx(module, tmp_path / "m.onnx", torch.zeros(1, 3, 32, 32))
    assert str(info.value).startswith("export_onnx: `example_input` of shape (1, 3, 32, 32) does not fit the model")
    assert "\n" not in str(info.value) and info.value.__cause__ is None


class _SameQParamsOnEveryRank(Callback):
    def on_train_end(self, trainer, pl_module):
        quantizers = all_quantizers(pl_module)  # inputs, weights, outputs and the residual additions' tensors
        assert all(q.initialized for q in quantizers)
        assert_same_on_every_rank(trainer, [t for q in quantizers for t in (q.scale, q.zero_point)])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["small CNN", "ResNet-20"])
def test_ddp_spawn_identical_quantization_parameters(tmp_path, model):
    pl.seed_everything(0)
    qat = QuantizationAwareTraining(start_epoch=0, calibration_steps=3, freeze_bn_epoch=0.5)
    trainer = make_trainer(
        tmp_path, callbacks=[qat, _SameQParamsOnEveryRank()], max_epochs=1, strategy="ddp_spawn", devices=2
    )
    net = ResNet20((1, 8, 8), 10, width=4) if model == "ResNet-20" else None
    trainer.fit(ClassificationModule(net) if net is not None else small_module(), DigitsDataModule())


class TanhSigmoidMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc3(torch.sigmoid(self.fc2(torch.tanh(self.fc1(x.flatten(1))))))


@pytest.mark.parametrize("bits", [1, 2])
def test_binary_and_two_bit_bounded_activations_export_with_parity(tmp_path, bits):
    pl.seed_everything(0)
    qat = QuantizationAwareTraining(
        start_epoch=1,
        layer_bits={
            r"fc2$": {"activation_bits": bits, "activation_range": (-1, 1)},
            r"fc3$": {"activation_bits": bits, "activation_range": (0, 1)},
        },
    )
    trainer, module, dm = fit(tmp_path, [qat], module=ClassificationModule(TanhSigmoidMLP()), max_epochs=4)
    assert trainer.test(module, dm, verbose=False)[0]["test/acc"] > 0.6
    assert module.net.fc2.input_quantizer.binary == (bits == 1)
    path = export_onnx(module, tmp_path / "m.onnx", torch.zeros(2, 1, 8, 8))
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("Where") == (2 if bits == 1 else 0)
    assert onnx_parity(module, path, dm.test_dataloader())["top1_agreement"] >= PARITY_GOAL


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(activation_bits=1),
            r"`activation_bits`=1 is the binary quantizer for bounded activations and needs `activation_range`",
        ),
        (dict(activation_range=(1, -1)), r"`activation_range` must be finite with low < high, got \(1, -1\)"),
        (dict(activation_range="tanh"), r"`activation_range` must be a pair \(low, high\)"),
        (
            dict(layer_bits={"fc": {"activation_bits": 1}}),
            r"`layer_bits\['fc'\]\['activation_bits'\]`=1 is the binary quantizer",
        ),
        (dict(activation_bits=0, activation_range=(0, 1)), r"`activation_bits` must be an integer from 1 to 8, got 0"),
    ],
)
def test_bad_bounded_activation_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**kwargs)


def test_quantized_outputs_export_qdq_after_every_layer_with_parity(tmp_path):
    pl.seed_everything(0)
    qat = QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=2, quantize_outputs=True)
    trainer, module, dm = fit(tmp_path, [qat], max_epochs=4)
    # features.0 -> BatchNorm -> ReLU -> features.3 and classifier.1 -> ReLU -> classifier.3: the next layer's input
    # quantizer quantizes those outputs (once); features.3 -> ... -> ReLU -> MaxPool -> features.7 and features.7 ->
    # ... -> ReLU -> Flatten -> classifier.1: the ReLU module quantizes them (its output is what the integer kernel
    # writes; the max pooling keeps that grid); the last layer quantizes its own
    plain = {"net.features.0", "net.features.3", "net.features.7", "net.classifier.1"}
    assert {n for n, m in quantized_layers(module).items() if not hasattr(m, "output_quantizer")} == plain
    assert module.net.features[5].output_quantizer.initialized and module.net.features[9].output_quantizer.initialized
    assert module.net.features[7].input_quantizer.source is module.net.features[5].output_quantizer  # pooled: its grid
    path = export_onnx(module, tmp_path / "m.onnx", torch.zeros(2, 1, 8, 8))
    graph = onnx.load(path).graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers = {o: [n for n in graph.node if o in n.input] for n in graph.node for o in n.output}
    for name in quantized_layers(module):
        if name in plain:
            (layer,) = [n for n in graph.node if f"{name}.weight_dequantized" in n.input]
            (relu,) = consumers[layer.output[0]]
            after = consumers[relu.output[0]]
            if [n.op_type for n in after] == ["Identity"]:  # a tensor quantizer's host: its output, then the pair
                after = consumers[after[0].output[0]]
            assert relu.op_type == "Relu" and [n.op_type for n in after] == ["QuantizeLinear"]
            continue
        conv = producers[f"{name}.output_float"]
        assert conv.op_type in ("Conv", "Gemm")
        assert [n.op_type for n in consumers[f"{name}.output_float"]] == ["QuantizeLinear"], name
    assert onnx_parity(module, path, dm.test_dataloader())["top1_agreement"] >= PARITY_GOAL
    # ONNX Runtime runs every layer on an integer kernel
    kernels = ort_optimized_kernels(path, tmp_path)
    assert kernels.count("QLinearConv") == 3 and kernels.count("QGemm") == 2
    assert not {"Conv", "FusedConv", "Gemm", "MatMul", "Relu"} & set(kernels)


def test_shared_initializers_in_the_float_export_are_handled(tmp_path):
    # BatchNorm frozen from the start: every folded bias is zero, and the exporter shares one zero initializer
    pl.seed_everything(0)
    qat = QuantizationAwareTraining(start_epoch=0, calibration_steps=2, freeze_bn_epoch=0)
    trainer, module, dm = fit(tmp_path, [qat], max_epochs=1)
    path = export_onnx(module, tmp_path / "m.onnx", torch.zeros(2, 1, 8, 8))
    assert onnx_parity(module, path, dm.test_dataloader())["top1_agreement"] >= PARITY_GOAL
