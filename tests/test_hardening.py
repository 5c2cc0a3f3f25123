"""Hardening (issue 10): no silent wrong model, no silently ignored setting. One test (or table) per numbered point;
each failed on the main before the fix."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer, small_module
from torch import nn

from lightning_compress import (
    KnowledgeDistillation,
    LowRankFactorization,
    MagnitudePruning,
    QATConfig,
    QuantizationAwareTraining,
    WeightClustering,
    cluster_weights_,
    export_onnx,
    load_compressed,
    low_rank_,
    onnx_parity,
    prepare_qat,
    prune_,
    save_compressed,
)
from lightning_compress.export.onnx import pruned_zeros_kept
from lightning_compress.quantization import float_state_dict
from lightning_compress.quantization.prepare import all_quantizers, qat_state_dict
from lightning_compress.tasks import ClassificationModule, DigitsDataModule, SmallCNN
from lightning_compress.tasks.models import BatchNormEverywhere


# --------------------------------------------------------------------------- 1. every QAT option exports what it trains
def digits_tensors():
    dm = DigitsDataModule(batch_size=128, seed=0)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    test = torch.cat([b[0] for b in dm.val_dataloader()])
    return x, y, test


OPTIONS = {
    "defaults": {},
    "weight_symmetric=False": dict(weight_symmetric=False),
    "fold_bn=False": dict(fold_bn=False),
    "per_channel=False": dict(per_channel=False),
    "activation_symmetric=True": dict(activation_symmetric=True),
    "observer=lsq": dict(observer="lsq"),
    "quantize_outputs=True": dict(quantize_outputs=True),
    "4 bits": dict(weight_bits=4, activation_bits=4),
    "affine, per tensor, unfolded, 4 bits": dict(
        weight_symmetric=False, per_channel=False, fold_bn=False, weight_bits=4, activation_bits=4
    ),  # fmt: skip
    "affine + lsq + outputs": dict(weight_symmetric=False, observer="lsq", quantize_outputs=True),
}


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_every_qat_option_exports_a_model_that_agrees(tmp_path, options):
    torch.manual_seed(0)
    x, y, test = digits_tensors()
    model = BatchNormEverywhere()
    prepare_qat(model, QATConfig(**options))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for bn in (model.features[1], model.head[2]):
        bn.eval()  # frozen statistics: the folded integer model from here on
    model(x)
    model.eval()
    path = export_onnx(model, tmp_path / "m.onnx", test[:64])
    parity = onnx_parity(model, path, [test])
    assert parity["top1_agreement"] >= 0.995, parity


def test_asymmetric_weights_keep_pruned_zeros_exactly(tmp_path):
    torch.manual_seed(0)
    x, y, test = digits_tensors()
    model = BatchNormEverywhere()
    with torch.no_grad():
        model.features[3].weight[:, :4] = 0.0  # pruned: half the input channels
    masks = {"features.3": model.features[3].weight != 0}
    prepare_qat(model, QATConfig(weight_symmetric=False))
    model.train()
    model(x)
    model.eval()
    path = export_onnx(model, tmp_path / "m.onnx", test[:64])
    assert pruned_zeros_kept(path, masks) == 1.0


def test_export_refuses_to_write_a_file_that_disagrees(tmp_path, monkeypatch):
    from lightning_compress.export import onnx as onnx_export

    torch.manual_seed(0)
    x, _, test = digits_tensors()
    model = BatchNormEverywhere()
    prepare_qat(model, QATConfig())
    model.train()
    model(x)
    model.eval()
    real = onnx_export._insert_qdq

    def broken(proto, info):  # a wrong int8 model: every weight's scale doubled
        import dataclasses

        real(proto, {n: dataclasses.replace(d, weight_scale=d.weight_scale * 2) for n, d in info.items()})

    monkeypatch.setattr(onnx_export, "_insert_qdq", broken)
    with pytest.raises(onnx_export.ExportMismatchError, match=r"would disagree with the model on \d+ of 64"):
        export_onnx(model, tmp_path / "wrong.onnx", test[:64])
    assert not (tmp_path / "wrong.onnx").exists()  # never a file that was not verified


# --------------------------------------------------------------------------- 2. a process that did not train
def test_callbacks_restore_their_state_in_a_process_that_did_not_train(tmp_path):
    """What the app does after ddp_spawn (Lightning copies only the weights back): a fresh model and fresh callbacks
    rebuild masks, quantizers and phase from the run's checkpoint, and compute exactly what the trained one does."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def callbacks():
        return [MagnitudePruning(final_sparsity=0.8, end_epoch=1), QuantizationAwareTraining(calibration_steps=2)]

    pl.seed_everything(0)
    trained, (pruning, qat) = small_module(), callbacks()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    make_trainer(tmp_path, max_epochs=2, callbacks=[pruning, qat, ckpt], enable_checkpointing=True).fit(
        trained, DigitsDataModule()
    )
    fresh, (pruning2, qat2) = small_module(), callbacks()
    trainer = make_trainer(tmp_path, max_epochs=2)
    pruning2.restore(trainer, fresh, ckpt.best_model_path)
    qat2.restore(trainer, fresh, ckpt.best_model_path)
    assert pruning2.masks.keys() == pruning.masks.keys()
    assert all(torch.equal(pruning2.masks[n], m) for n, m in pruning.masks.items())
    assert pruning2.sparsity() == pytest.approx(0.8, abs=1e-3) and qat2.target_reached
    trained.eval(), fresh.eval()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
    with pytest.raises(ValueError, match=r"holds no state of this callback"):
        MagnitudePruning(include="classifier").restore(trainer, small_module(), ckpt.best_model_path)


# --------------------------------------------------------------------------- 3. reusing callback instances
def test_reused_callbacks_compress_the_new_model(tmp_path, digits):
    pruning = MagnitudePruning(final_sparsity=0.8, end_epoch=1)
    qat = QuantizationAwareTraining(calibration_steps=2)
    for seed in (0, 1):
        pl.seed_everything(seed)
        module = small_module()
        make_trainer(tmp_path / str(seed), max_epochs=2, callbacks=[pruning, qat]).fit(module, datamodule=digits)
        modules = dict(module.named_modules())
        weights = [modules[n].weight for n in pruning.selected_layers]
        assert all(w is pruning.weights[n] for n, w in zip(pruning.selected_layers, weights, strict=True))
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert zeros == pytest.approx(0.8, abs=1e-3)  # this model, not the previous one, is pruned
        assert qat.target_reached and all(modules[n] is layer for n, layer in qat.layers.items())


# --------------------------------------------------------------------------- 4. manual optimization
class ManualTwoOptimizers(ClassificationModule):
    def __init__(self):
        super().__init__(SmallCNN(width=8, hidden=32))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self(x), y))
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net.features.parameters(), lr=0.01),
                torch.optim.SGD(self.net.classifier.parameters(), lr=0.01)]  # fmt: skip


class ManualOne(ManualTwoOptimizers):
    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize(
    "callback, module, message",
    [
        (lambda: MagnitudePruning(end_epoch=1), ManualTwoOptimizers, r"MagnitudePruning counts its schedule in optimi"),
        (
            lambda: QuantizationAwareTraining(calibration_steps=1),
            ManualTwoOptimizers,
            r"with manual optimization and 2",
        ),
        (lambda: KnowledgeDistillation(SmallCNN()), ManualOne, r"ignores under manual optimization"),
    ],
)
def test_manual_optimization_that_would_be_wrong_is_refused_before_the_first_step(tmp_path, callback, module, message):
    model = module()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, max_epochs=2, callbacks=[callback()]).fit(model, DigitsDataModule())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # no step was taken


def test_manual_distillation_through_kd_loss_changes_the_weights(tmp_path):
    class ManualKD(ManualOne):
        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers()
            opt.zero_grad()
            logits = self(x)
            self.manual_backward(kd.loss(self, logits, x, nn.functional.cross_entropy(logits, y)))
            opt.step()

    results = []
    for distil in (False, True):
        kd = KnowledgeDistillation(SmallCNN(), alpha=1.0, wrap_training_step=False)
        pl.seed_everything(0)
        model = ManualKD() if distil else ManualOne()
        make_trainer(tmp_path / str(distil), max_epochs=1, callbacks=[kd]).fit(model, DigitsDataModule())
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(*results)


# --------------------------------------------------------------------------- 5. attention and other layer types
class TinyTransformer(ClassificationModule):
    """Digits rows as a sequence of 8 tokens: Linear embedding, one TransformerEncoder layer, Linear head."""

    def __init__(self):
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Linear(8, 16)
                layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
                self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
                self.head = nn.Linear(16, 10)

            def forward(self, x):
                return self.head(self.encoder(self.embed(x.flatten(1).unflatten(1, (8, 8)))).mean(1))

        super().__init__(Net(), lr=3e-3)


def test_transformer_prunes_quantizes_and_exports_and_names_what_it_leaves(tmp_path):
    pl.seed_everything(0)
    module = TinyTransformer()
    pruning = MagnitudePruning(final_sparsity=0.5, end_epoch=2)
    qat = QuantizationAwareTraining(calibration_steps=5, freeze_observers_epoch=3)
    with pytest.warns(UserWarning, match=r"does not compress 1 layer.*'net.encoder.layers.0.self_attn' \(Multihea"):
        trainer = make_trainer(tmp_path, max_epochs=4, callbacks=[pruning, qat])
        trainer.fit(module, DigitsDataModule())
    assert "net.encoder.layers.0.self_attn.out_proj" in pruning.selected_layers  # its weight is pruned in place
    assert "net.encoder.layers.0.self_attn.out_proj" not in qat.layers  # read by the attention kernel: float
    assert set(qat.layers) == {"net.embed", "net.encoder.layers.0.linear1", "net.encoder.layers.0.linear2", "net.head"}
    dm = DigitsDataModule()
    dm.setup("test")
    path = export_onnx(module, tmp_path / "t.onnx", next(iter(dm.test_dataloader()))[0])  # Linear on 3-D inputs
    parity = onnx_parity(module, path, dm.test_dataloader())
    assert parity["top1_agreement"] >= 0.995
    assert pruned_zeros_kept(path, {n: m for n, m in pruning.masks.items() if n in qat.layers}) == 1.0


@pytest.mark.parametrize(
    "layer, kind",
    [(nn.ConvTranspose2d(1, 1, 3), "ConvTranspose2d"), (nn.LSTM(8, 8), "LSTM"), (nn.Embedding(10, 8), "Embedding")],
)
def test_layer_types_that_are_not_compressed_are_named(tmp_path, layer, kind):
    module = small_module()
    module.extra = layer  # held by the module (not used in forward): its weights would be silently dense
    with pytest.warns(UserWarning, match=rf"does not compress 1 layer.*'extra' \({kind}"):
        make_trainer(tmp_path, max_epochs=1, callbacks=[MagnitudePruning(end_epoch=1)]).fit(module, DigitsDataModule())
    other = small_module()
    other.extra = layer
    with pytest.warns(UserWarning, match=rf"Quantization-aware training does not compress 1 layer.*'extra' \({kind}"):
        prepare_qat(other, QATConfig())


class Conv1DLike(nn.Module):
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's blocks): a Linear whose weight is stored
    ``in × out`` — not an ``nn.Linear``."""

    def __init__(self, n_out: int, n_in: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


class Gate(nn.Module):
    """A module with a weight matrix of its own that is no Linear (an element-wise gate from a pooled matrix)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n) * 0.02)

    def forward(self, x):
        return x * torch.sigmoid(self.weight.sum(0))


class WithConv1D(nn.Module):  # a classifier whose hidden layer is a Conv1D, as GPT-2's MLP, then a gate
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 32))
        self.mlp = Conv1DLike(32, 32)
        self.gate = Gate(32)
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        return self.classifier(self.gate(torch.relu(self.mlp(torch.relu(self.features(x))))))


@pytest.mark.parametrize(
    "technique",
    [
        lambda: MagnitudePruning(final_sparsity=0.5, end_epoch=1, scope="layer"),
        lambda: WeightClustering(clusters=4, start_epoch=0),
        lambda: LowRankFactorization(ratio=2, end_epoch=1, include="mlp"),
    ],
    ids=["pruning", "clustering", "low rank"],
)
def test_a_conv1d_is_compressed_and_a_layer_of_an_unknown_type_is_named_never_silently_dense(tmp_path, technique):
    from lightning_compress.tasks import ClassificationModule

    callback = technique()
    module = ClassificationModule(WithConv1D())
    with pytest.warns(UserWarning, match=r"does not compress 1 layer.*'net.gate' \(Gate: a layer type the ") as seen:
        make_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(module, DigitsDataModule())
    assert not any("net.mlp" in str(w.message) for w in seen)  # the Conv1D is a layer like any Linear
    weight = module.net.mlp.weight.detach()
    if isinstance(callback, MagnitudePruning):
        assert float((weight == 0).float().mean()) == 0.5
    elif isinstance(callback, WeightClustering):
        assert torch.unique(weight).numel() <= 4
    else:
        assert int(torch.linalg.matrix_rank(weight)) == callback.ranks["net.mlp"] < 32
    with pytest.warns(UserWarning, match=r"Quantization-aware training does not compress 1 layer.*'gate' \(Gate"):
        assert "mlp" in prepare_qat(WithConv1D(), QATConfig())
    verb = {MagnitudePruning: lambda m: prune_(m, 0.5), WeightClustering: lambda m: cluster_weights_(m, 4),
            LowRankFactorization: lambda m: low_rank_(m, 2, include="mlp")}[type(callback)]  # fmt: skip
    with pytest.warns(UserWarning, match=rf"{type(callback).__name__} does not compress 1 layer.*'gate' \(Gate"):
        verb(WithConv1D())  # the verb says the same


# --------------------------------------------------------------------------- 6. QAT checkpoints, strict loading
def test_qat_checkpoint_loads_strict_into_the_plain_and_the_prepared_class(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_compress.tasks import ClassificationModule, SmallCNN

    class Digits(ClassificationModule):  # the user's own class, as load_from_checkpoint rebuilds it
        def __init__(self, width: int = 8, hidden: int = 32) -> None:
            super().__init__(SmallCNN((1, 8, 8), 10, width=width, hidden=hidden))
            self.save_hyperparameters()

    pl.seed_everything(0)
    module = Digits()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    weights = ModelCheckpoint(dirpath=tmp_path, filename="weights", save_weights_only=True, monitor="val/acc")
    qat = QuantizationAwareTraining(calibration_steps=2)
    make_trainer(tmp_path, max_epochs=2, callbacks=[qat, ckpt, weights], enable_checkpointing=True).fit(
        module, DigitsDataModule()
    )
    checkpoint = torch.load(ckpt.best_model_path, weights_only=True)
    # The checkpoint's state_dict is the float model's: the user's plain class loads it, strictly (a weights-only
    # checkpoint too).
    plain = Digits.load_from_checkpoint(ckpt.best_model_path).eval()
    weights_only = torch.load(weights.best_model_path, weights_only=True)
    assert "callbacks" not in weights_only and set(weights_only["state_dict"]) == set(plain.state_dict())
    Digits.load_from_checkpoint(weights.best_model_path)  # strict
    assert set(checkpoint["state_dict"]) == set(plain.state_dict()) == set(float_state_dict(module.state_dict()))
    prepared = Digits()
    prepare_qat(prepared, qat.config)
    prepared.load_state_dict(qat_state_dict(checkpoint), strict=True)  # the quantized model
    prepared.eval(), module.eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(prepared(x), module(x))
        with qat.disabled():
            assert torch.allclose(plain(x), module(x), atol=1e-5)  # the float model with the trained weights
    # test(ckpt_path=...) on a Trainer with the callback restores the quantizers' ranges of that checkpoint too.
    for q in all_quantizers(module):
        q.reset_range()
    make_trainer(tmp_path, callbacks=[qat]).test(module, DigitsDataModule(), ckpt_path=ckpt.best_model_path)
    with torch.no_grad():
        assert torch.equal(prepared(x), module.eval()(x))


# --------------------------------------------------------------------------- 7. settings that would silently do nothing
@pytest.mark.parametrize(
    "callbacks, trainer_kwargs, message",
    [
        (lambda: [QuantizationAwareTraining(start_epoch=5)], dict(max_epochs=3),
         r"QuantizationAwareTraining\(start_epoch=5\) is past the end of Trainer\(max_epochs=3\)"),
        (lambda: [QuantizationAwareTraining(start_epoch=1, calibration_steps=500)], dict(max_epochs=2),
         r"would never fake-quantize: it starts at optimizer step 19 .* calibration_steps=500"),
        (lambda: [MagnitudePruning(include=[])], dict(max_epochs=10), r"`include` is an empty list"),
    ],
)  # fmt: skip
def test_settings_that_cannot_take_effect_are_refused(tmp_path, callbacks, trainer_kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, callbacks=callbacks(), **trainer_kwargs).fit(small_module(), DigitsDataModule())


# --------------------------------------------------------------------------- 8. errors name the argument or file
@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: MagnitudePruning(include=5), TypeError, r"`include` must be a regular expression, an @selector"),
        (lambda: MagnitudePruning(seed="abc"), ValueError, r"`seed` must be an integer, got 'abc'"),
        (lambda: QuantizationAwareTraining(averaging_constant="x"), ValueError, r"`averaging_constant` must be a"),
        (lambda: QuantizationAwareTraining(per_channel="no"), ValueError, r"`per_channel` must be True or False"),
    ],
)
def test_bad_arguments_name_themselves(build, error, message):
    with pytest.raises(error, match=message):
        cb = build()
        cb.setup(make_trainer(None, max_epochs=1), small_module(), "fit")


def test_export_and_artifact_errors_name_what_was_wrong(tmp_path):
    import numpy as np

    model = nn.Sequential(nn.Linear(4, 2))
    prepare_qat(model, QATConfig())
    model(torch.randn(3, 4))
    with pytest.raises(TypeError, match=r"`example_input` must be a torch.Tensor batch, got ndarray"):
        export_onnx(model, tmp_path / "m.onnx", np.zeros((2, 4), np.float32))
    short = tmp_path / "short.lcz"
    short.write_bytes(b"LCZ1\x00\x00")
    with pytest.raises(ValueError, match=r"short.lcz is a damaged lightning-compress artifact"):
        load_compressed(short)
    good = tmp_path / "good.lcz"
    save_compressed(nn.Linear(4, 2), good)
    data = good.read_bytes()
    (tmp_path / "bad.lcz").write_bytes(data[:8] + b"\xff" * (len(data) - 8))
    with pytest.raises(ValueError, match=r"bad.lcz is a damaged lightning-compress artifact"):
        load_compressed(tmp_path / "bad.lcz")


# --------------------------------------------------------------------------- 9. tied weights, frozen layers
class Tied(ClassificationModule):
    def __init__(self):
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                       nn.Linear(64, 10)))  # fmt: skip
        self.net[3].weight = self.net[1].weight  # tied


def test_tied_weights_are_counted_once(tmp_path):
    module = Tied()
    pruning = MagnitudePruning(final_sparsity=0.5, end_epoch=1)
    make_trainer(tmp_path, max_epochs=1, callbacks=[pruning]).fit(module, DigitsDataModule())
    unique = {id(p): p for p in (module.net[1].weight, module.net[5].weight)}.values()
    zeros = sum(int((p == 0).sum()) for p in unique)
    assert zeros / sum(p.numel() for p in unique) == pytest.approx(0.5, abs=1e-3) == pruning.sparsity()


def test_frozen_layers_are_left_dense_with_a_message(tmp_path):
    module = small_module()
    module.net.features[0].weight.requires_grad_(False)
    pruning = MagnitudePruning(final_sparsity=0.5, end_epoch=1)
    with pytest.warns(
        UserWarning, match=r"leaves 1 frozen layer\(s\) \(weight.requires_grad=False\) as they are: 'net.f"
    ):
        make_trainer(tmp_path, max_epochs=1, callbacks=[pruning]).fit(module, DigitsDataModule())
    assert "net.features.0" not in pruning.selected_layers
    assert int((module.net.features[0].weight == 0).sum()) == 0


# --------------------------------------------------------------------------- 10. smaller points
def test_compression_target_with_a_metric_never_logged_fails_before_training(tmp_path):
    from lightning_compress import CompressionTarget

    module = small_module()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(KeyError, match=r"monitor='val/f1'"):
        make_trainer(tmp_path, max_epochs=2, callbacks=[CompressionTarget("val/f1")]).fit(module, DigitsDataModule())
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_distillation_under_bf16_true(tmp_path):
    teacher = SmallCNN()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd = KnowledgeDistillation(teacher, alpha=0.5)
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[kd], precision="bf16-true", limit_train_batches=3)
    trainer.fit(small_module(), DigitsDataModule())
    assert math.isfinite(float(trainer.callback_metrics["kd/loss_kd_epoch"]))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # still fp32, bit-identical


# --------------------------------------------------------------------------- 13. sharded strategies
@pytest.mark.parametrize("callback", [MagnitudePruning, QuantizationAwareTraining])
def test_sharded_strategies_are_refused_at_setup(callback):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))  # FSDP needs a GPU here: its type is enough
    with pytest.raises(ValueError, match=r"does not support strategy FSDPStrategy: it shards parameters"):
        callback().setup(trainer, small_module(), "fit")


def test_a_qat_model_still_pickles_and_copies(tmp_path):
    """The prepared model's checkpoint hook is an object, not a closure: torch.save of the whole module (the app's
    compact network), deepcopy (export_compact) and ddp_spawn's pickling keep working."""
    import copy
    import pickle

    module = small_module()
    qat = QuantizationAwareTraining(calibration_steps=1)
    make_trainer(tmp_path, max_epochs=1, limit_train_batches=3, callbacks=[qat]).fit(module, DigitsDataModule())
    for clone in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        assert clone.on_load_checkpoint.module is clone
        x = torch.randn(2, 1, 8, 8)
        with torch.no_grad():
            assert torch.equal(clone.eval()(x), module.eval()(x))
