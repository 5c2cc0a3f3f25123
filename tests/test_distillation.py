"""KnowledgeDistillation on unmodified LightningModules, in real Trainer runs on digits."""

from __future__ import annotations

import copy
import csv
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import TensorDataset

from lightning_compress import KnowledgeDistillation, MagnitudePruning, QuantizationAwareTraining, distillation_loss
from lightning_compress.core.losses import kd_loss
from lightning_compress.tasks import MLP, ClassificationModule, DigitsDataModule, SmallCNN


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    pl.seed_everything(0)
    module = ClassificationModule(SmallCNN(width=16, hidden=64), lr=1e-2)
    make_trainer(tmp_path_factory.mktemp("teacher"), max_epochs=8).fit(module, DigitsDataModule())
    return module.net.eval()


def student(**kwargs):
    return ClassificationModule(MLP(hidden=[32]), lr=1e-2, **kwargs)


def fit(tmp_path, callbacks, module=None, datamodule=None, **kwargs):
    module = module or student()
    datamodule = datamodule or DigitsDataModule()
    trainer = make_trainer(tmp_path, callbacks=callbacks, **kwargs)
    trainer.fit(module, datamodule)
    return trainer, module, datamodule


# --------------------------------------------------------------------------- the loss
def test_kd_loss_is_t_squared_kl_in_float32():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    T = 3.0
    p_t = torch.softmax(t / T, -1)
    expected = (p_t * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    torch.testing.assert_close(kd_loss(s, t, T), expected)
    assert kd_loss(s.bfloat16(), t.bfloat16(), T).dtype == torch.float32
    extreme = kd_loss(torch.tensor([[1e4, -1e4]]).half(), torch.tensor([[-1e4, 1e4]]).half(), 1.0)
    assert math.isfinite(float(extreme))
    with pytest.raises(ValueError, match=r"student \(8, 10\), teacher \(8, 5\)"):
        kd_loss(s, t[:, :5])


def test_kd_loss_over_tokens_is_the_mean_per_token_and_a_mask_leaves_padding_out():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 16, 50, generator=g), torch.randn(2, 16, 50, generator=g)  # (batch, tokens, vocab)
    per_token = torch.stack([kd_loss(s[b, i : i + 1], t[b, i : i + 1], 2.0) for b in range(2) for i in range(16)])
    torch.testing.assert_close(kd_loss(s, t, 2.0), per_token.mean())  # not 16 times it (the sum over tokens)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0  # the second sequence is 10 tokens, then padding
    kept = torch.cat([per_token[:16], per_token[16:26]])
    torch.testing.assert_close(kd_loss(s, t, 2.0, mask), kept.mean())
    garbage = t.clone()
    garbage[1, 10:] = 1e3  # whatever the teacher says on padding does not count
    torch.testing.assert_close(kd_loss(s, garbage, 2.0, mask), kept.mean())
    torch.testing.assert_close(distillation_loss(s, t, config={"temperature": 2.0}, mask=mask), kept.mean())
    with pytest.raises(ValueError, match=r"`mask` must have the logits' shape without the class dimension"):
        kd_loss(s, t, 2.0, mask[:, :8])


def test_vocabulary_sized_logits_are_distilled_by_chunks_keeping_no_float_copy_of_them(monkeypatch):
    """A language model's logits (batch × tokens × vocabulary) are taken in chunks, the gradient written as it goes:
    what autograd keeps for the backward is that gradient (the student's shape and type: the copy every loss makes),
    no float32 copy of the logits — and the loss and its gradient are those of the loss in one piece."""
    from lightning_compress.core import losses

    g = torch.Generator().manual_seed(0)
    shape = (2, 64, 3000)  # 384,000 values: 12 chunks of 32,768 (a chunk: 10 predictions)
    student = torch.randn(shape, generator=g, dtype=torch.bfloat16).requires_grad_()
    teacher = torch.randn(shape, generator=g, dtype=torch.bfloat16)
    mask = (torch.rand(shape[:2], generator=g) > 0.25).long()
    monkeypatch.setattr(losses, "CHUNK", 1 << 15)
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: kept.append(x) or x, lambda x: x):
        chunked = kd_loss(student, teacher, 2.0, mask)
    large = [(tuple(x.shape), x.dtype) for x in kept if x.numel() > 1 << 15]
    assert large == [((128, 3000), torch.bfloat16)]  # the gradient, nothing else of the logits' size
    chunked.backward(retain_graph=True)
    by_chunks = student.grad.clone()
    with pytest.raises(RuntimeError, match="a second backward through it"):
        chunked.backward()  # its gradient was scaled in place: refused, not silently doubled
    student.grad = None
    monkeypatch.setattr(losses, "CHUNK", 1 << 62)
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: kept.append(x) or x, lambda x: x):
        whole = kd_loss(student, teacher, 2.0, mask)
    assert [x for x in kept if x.numel() == student.numel() and x.dtype == torch.float32]  # the copies it avoids
    whole.backward()
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(by_chunks, student.grad)
    trained_teacher = teacher.clone().requires_grad_()  # a teacher that takes a gradient: checkpointed chunks
    monkeypatch.setattr(losses, "CHUNK", 1 << 15)
    kd_loss(student, trained_teacher, 2.0, mask).backward()
    assert trained_teacher.grad is not None and torch.isfinite(trained_teacher.grad.float()).all()


# --------------------------------------------------------------------------- the teacher drives learning
class ShuffledLabels(DigitsDataModule):
    """Digits whose training labels are a random permutation: nothing to learn from them."""

    def setup(self, stage=None):
        super().setup(stage)
        x, y = self.train_set.tensors
        self.train_set = TensorDataset(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))])


def test_teacher_signal_drives_learning_when_labels_are_useless(tmp_path, teacher):
    pl.seed_everything(1)
    _, alone, dm = fit(tmp_path / "a", [], datamodule=ShuffledLabels(), max_epochs=6)
    alone_acc = make_trainer(tmp_path).test(alone, dm, verbose=False)[0]["test/acc"]
    pl.seed_everything(1)
    kd = KnowledgeDistillation(teacher, temperature=2.0, alpha=1.0)  # alpha=1: the labels play no part
    _, distilled, dm = fit(tmp_path / "b", [kd], datamodule=ShuffledLabels(), max_epochs=6)
    distilled_acc = make_trainer(tmp_path).test(distilled, dm, verbose=False)[0]["test/acc"]
    assert alone_acc < 0.3 and distilled_acc > 0.85


# --------------------------------------------------------------------------- the teacher's guarantees
class WatchTeacher(Callback):
    def __init__(self, teacher):
        self.teacher, self.modes = teacher, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.modes.append(self.teacher.training)
        optimised = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        assert not any(id(p) in optimised for p in self.teacher.parameters())


def test_teacher_frozen_unchanged_and_not_in_the_student_checkpoint(tmp_path, teacher):
    before = copy.deepcopy(teacher.state_dict())
    kd = KnowledgeDistillation(teacher, temperature=4.0, alpha=0.7)
    watch = WatchTeacher(teacher)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    trainer, module, _ = fit(tmp_path, [kd, watch, ckpt], max_epochs=2, enable_checkpointing=True)
    assert watch.modes and not any(watch.modes)
    assert all(not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # weights and BatchNorm statistics bit-identical
    assert next(teacher.parameters()).device == module.device
    state = torch.load(ckpt.best_model_path, weights_only=True)
    assert not any("teacher" in k for k in state["state_dict"])
    student().load_state_dict(state["state_dict"], strict=True)  # the student's own, unmodified class
    (identity,) = state["callbacks"][kd.state_key]["teachers"]
    assert identity["class"].endswith("SmallCNN") and len(identity["sha256"]) == 64
    assert "training_step" not in vars(module)  # the wrapper is gone after fit


def test_logs_and_dict_returning_step(tmp_path, teacher):
    class DictStep(ClassificationModule):
        def training_step(self, batch, batch_idx):
            return {"loss": super().training_step(batch, batch_idx), "extra": 1}

    logger = CSVLogger(tmp_path, name="csv")
    fit(
        tmp_path,
        [KnowledgeDistillation(teacher)],
        module=DictStep(MLP(hidden=[32])),
        max_epochs=1,
        logger=logger,
        log_every_n_steps=1,
    )
    with open(logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    for key in ("kd/loss_task", "kd/loss_kd", "kd/teacher_agreement", "kd/loss_kd_epoch", "kd/loss_task_epoch"):
        assert any(r.get(key) for r in rows), key
    agreement = [float(r["kd/teacher_agreement_epoch"]) for r in rows if r.get("kd/teacher_agreement_epoch")]
    assert 0 <= agreement[-1] <= 1


def test_explicit_loss_call_without_wrapping(tmp_path, teacher):
    kd = KnowledgeDistillation(teacher, alpha=0.5, wrap_training_step=False)

    class Explicit(ClassificationModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)  # not self(x): the wrapper could not see it
            return kd.loss(self, logits, x, torch.nn.functional.cross_entropy(logits, y))

    trainer, module, dm = fit(tmp_path, [kd], module=Explicit(MLP(hidden=[32]), lr=1e-2), max_epochs=2)
    assert trainer.callback_metrics["kd/loss_kd_epoch"] > 0


def test_step_that_never_calls_forward_is_explained(tmp_path, teacher):
    class NoForward(ClassificationModule):
        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    with pytest.raises(RuntimeError, match=r"did not call the module's forward .*wrap_training_step=False"):
        fit(tmp_path, [KnowledgeDistillation(teacher)], module=NoForward(MLP(hidden=[32])), max_epochs=1)


def test_several_teachers_are_weighted(teacher):
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.classifier[3].bias.add_(3.0)
    kd = KnowledgeDistillation([teacher, other], teacher_weights=[3, 1], alpha=1.0, temperature=2.0)
    x = torch.rand(4, 1, 8, 8)
    s = torch.randn(4, 10)
    module = student()
    module.log_dict = lambda *a, **k: None  # outside a Trainer
    expected = 0.75 * kd_loss(s, teacher(x), 2.0) + 0.25 * kd_loss(s, other(x), 2.0)
    torch.testing.assert_close(kd.loss(module, s, x, None), expected)


def test_cache_skips_the_teacher_after_the_first_epoch_and_changes_nothing(tmp_path, teacher):
    calls = []
    hook = teacher.register_forward_hook(lambda *a: calls.append(1))
    try:
        pl.seed_everything(0)
        _, cached, _ = fit(
            tmp_path / "a",
            [KnowledgeDistillation(teacher, cache_teacher_outputs=True)],
            max_epochs=3,
            limit_val_batches=0,
        )
        with_cache = len(calls)
        calls.clear()
        pl.seed_everything(0)
        _, plain, _ = fit(tmp_path / "b", [KnowledgeDistillation(teacher)], max_epochs=3, limit_val_batches=0)
    finally:
        hook.remove()
    batches = len(calls) // 3
    assert with_cache == batches  # only the first epoch ran the teacher
    for (k, a), (_, b) in zip(cached.state_dict().items(), plain.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=k)


def test_a_stored_cache_skips_the_teacher_from_the_first_epoch_of_the_next_run(tmp_path, teacher):
    calls = []
    hook = teacher.register_forward_hook(lambda *a: calls.append(1))
    stages = tmp_path / "stages"
    try:
        runs = []
        for name in ("first", "second"):
            calls.clear()
            pl.seed_everything(0)
            kd = KnowledgeDistillation(teacher, cache_teacher_outputs=True, cache_dir=stages)
            runs.append(fit(tmp_path / name, [kd], max_epochs=2, limit_val_batches=0)[1])
            runs.append(len(calls))
    finally:
        hook.remove()
    assert runs[1] > 0 and runs[3] == 0  # the second run never ran the teacher
    for (k, a), (_, b) in zip(runs[0].state_dict().items(), runs[2].state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=k)  # and trained the same student
    [stored] = stages.glob("teacher-outputs-*.pt")
    stored.write_bytes(b"not a tensor file")
    kd = KnowledgeDistillation(teacher, cache_teacher_outputs=True, cache_dir=stages)
    with pytest.warns(RuntimeWarning, match="cached teacher-outputs stage .* is corrupt"):
        fit(tmp_path / "third", [kd], max_epochs=1, limit_val_batches=0)
    with pytest.raises(ValueError, match="set cache_teacher_outputs=True with it"):
        KnowledgeDistillation(teacher, cache_dir=stages)


def test_bf16_mixed_precision_stays_finite(tmp_path, teacher):
    trainer, module, _ = fit(
        tmp_path, [KnowledgeDistillation(teacher, alpha=0.9)], max_epochs=1, precision="bf16-mixed"
    )
    assert math.isfinite(float(trainer.callback_metrics["kd/loss_kd_epoch"]))


def test_resume_equals_uninterrupted(tmp_path, teacher):
    def run(root, ckpt_path=None, seed=0):
        pl.seed_everything(seed)
        module = student()
        ckpt = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)
        trainer = make_trainer(
            root, callbacks=[KnowledgeDistillation(teacher, alpha=0.7), ckpt], max_epochs=3, enable_checkpointing=True
        )
        trainer.fit(module, DigitsDataModule(), ckpt_path=ckpt_path)
        return module

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", ckpt_path=tmp_path / "full" / "epoch=0.ckpt", seed=5)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)


def test_composes_with_pruning_and_quantization(tmp_path, teacher):
    from lightning_compress import export_onnx, onnx_parity

    pl.seed_everything(0)
    pruning = MagnitudePruning(final_sparsity=0.5, end_epoch=2)
    callbacks = [pruning, QuantizationAwareTraining(start_epoch=1), KnowledgeDistillation(teacher, alpha=0.5)]
    trainer, module, dm = fit(tmp_path, callbacks, max_epochs=3)
    total = sum(w.numel() for w in pruning.weights.values())
    assert sum(w.numel() - int(torch.count_nonzero(w)) for w in pruning.weights.values()) == round(0.5 * total)
    path = export_onnx(module, tmp_path / "m.onnx", torch.zeros(2, 1, 8, 8))
    assert onnx_parity(module, path, dm.test_dataloader())["top1_agreement"] >= 0.995


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=0), r"`temperature` must be a finite number > 0, got 0"),
        (dict(temperature=-1.0), r"`temperature` must be a finite number > 0, got -1.0"),
        (dict(alpha=1.5), r"`alpha` must be in \[0, 1\], got 1.5"),
        (dict(alpha=math.nan), r"`alpha` must be in \[0, 1\], got nan"),
        (dict(teacher_weights=[1, 2]), r"`teacher_weights` must hold 1 finite non-negative numbers"),
    ],
)
def test_bad_arguments(kwargs, message, teacher):
    with pytest.raises(ValueError, match=message):
        KnowledgeDistillation(teacher, **kwargs)


def test_teacher_checkpoint_that_does_not_load(tmp_path, teacher):
    torch.save({"state_dict": {"something.else": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"teacher checkpoint .*bad.ckpt' does not load into SmallCNN"):
        KnowledgeDistillation(SmallCNN(width=16, hidden=64), teacher_checkpoint=tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"teacher checkpoint .*missing.ckpt' does not exist"):
        KnowledgeDistillation(SmallCNN(), teacher_checkpoint=tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match=r"`teacher` config needs a `_target_`"):
        KnowledgeDistillation({"width": 3})
    # a teacher config is built when fit starts (or by build_teachers), never by the constructor
    kd = KnowledgeDistillation(
        {"_target_": "lightning_compress.tasks.SmallCNN"}, teacher_checkpoint=tmp_path / "bad.ckpt"
    )
    with pytest.raises(RuntimeError, match=r"built when fit starts \(setup\); call build_teachers\(\)"):
        _ = kd.teachers
    with pytest.raises(ValueError, match=r"teacher checkpoint .*bad.ckpt' does not load into SmallCNN"):
        fit(tmp_path, [kd], max_epochs=1)
    # a good checkpoint, from a config: loads
    torch.save({"state_dict": teacher.state_dict()}, tmp_path / "good.ckpt")
    kd = KnowledgeDistillation(
        {"_target_": "lightning_compress.tasks.SmallCNN", "width": 16, "hidden": 64},
        teacher_checkpoint=tmp_path / "good.ckpt",
    )
    assert torch.equal(kd.build_teachers()[0].classifier[3].weight, teacher.classifier[3].weight)


def test_output_shapes_differ_on_the_first_batch(tmp_path):
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
    with pytest.raises(
        ValueError, match=r"outputs differ in shape on the first batch: student \(64, 10\), teacher \(64, 7\)"
    ):
        fit(tmp_path, [KnowledgeDistillation(wrong)], max_epochs=1)


@pytest.mark.slow
def test_ddp_spawn(tmp_path, teacher):
    pl.seed_everything(0)
    module = student()
    trainer = make_trainer(
        tmp_path, callbacks=[KnowledgeDistillation(teacher, alpha=0.7)], max_epochs=1, strategy="ddp_spawn", devices=2
    )
    trainer.fit(module, DigitsDataModule())
    assert trainer.callback_metrics["kd/loss_kd_epoch"] > 0


# --------------------------------------------------------------------------- feature (hint) distillation
def test_feature_hints_train_adapters_and_leave_the_student_clean(tmp_path, teacher):
    pl.seed_everything(0)
    module = ClassificationModule(SmallCNN(width=8, hidden=32), lr=1e-2)  # features.3: 16 channels; teacher's: 32
    kd = KnowledgeDistillation(teacher, alpha=0.5, feature_pairs={"net.features.3": "features.3"}, feature_weight=2.0)

    class WatchAdapters(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            adapter = pl_module._kd_adapters["net__features__3"]
            assert isinstance(adapter, nn.Conv2d) and adapter.weight.shape == (32, 16, 1, 1)
            optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            assert id(adapter.weight) in optimised
            self.last = adapter.weight.detach().clone()

    watch = WatchAdapters()
    logger = CSVLogger(tmp_path, name="csv")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    fit(
        tmp_path,
        [kd, watch, ckpt],
        module=module,
        max_epochs=3,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=True,
    )
    with open(logger.experiment.metrics_file_path) as f:
        hints = [float(r["kd/loss_feature_epoch"]) for r in csv.DictReader(f) if r.get("kd/loss_feature_epoch")]
    assert len(hints) == 3 and hints[-1] < hints[0]  # the student's features move towards the teacher's
    assert not hasattr(module, "_kd_adapters") and "on_load_checkpoint" not in vars(module)
    assert not module._load_state_dict_post_hooks  # the callback's load hook went with teardown
    state = torch.load(ckpt.best_model_path, weights_only=True)
    assert not any("_kd_adapters" in k for k in state["state_dict"])
    ClassificationModule(SmallCNN(width=8, hidden=32)).load_state_dict(state["state_dict"], strict=True)
    saved = state["callbacks"][kd.state_key]["adapters"]  # in the callback's own state
    assert torch.equal(saved["net__features__3.weight"], watch.last)

    # resuming restores the adapters through the callback's checkpoint hooks: the first step starts from them
    class FirstAdapter(Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            if not hasattr(self, "first"):
                self.first = pl_module._kd_adapters["net__features__3"].weight.detach().clone()

    resumed = ClassificationModule(SmallCNN(width=8, hidden=32), lr=1e-2)
    kd2 = KnowledgeDistillation(teacher, alpha=0.5, feature_pairs={"net.features.3": "features.3"}, feature_weight=2.0)
    first = FirstAdapter()
    trainer = make_trainer(tmp_path / "resumed", callbacks=[kd2, first], max_epochs=4)
    trainer.fit(resumed, DigitsDataModule(), ckpt_path=ckpt.best_model_path)
    assert torch.equal(first.first, watch.last)
    assert trainer.global_step > 0 and not hasattr(resumed, "_kd_adapters")


def test_feature_pair_names_must_exist(tmp_path, teacher):
    with pytest.raises(
        ValueError, match=r"the teacher has no module 'features.99'. Candidates: 'features', 'features.0'"
    ):
        KnowledgeDistillation(teacher, feature_pairs={"net.features.3": "features.99"})
    kd = KnowledgeDistillation(teacher, feature_pairs={"net.encoder": "features.3"})
    with pytest.raises(ValueError, match=r"the student has no module 'net.encoder'. Candidates: 'net', 'net.net'"):
        fit(tmp_path, [kd], max_epochs=1)
    with pytest.raises(ValueError, match=r"`cache_teacher_outputs` skips the teacher's forward"):
        KnowledgeDistillation(teacher, feature_pairs={"net.net.1": "classifier.1"}, cache_teacher_outputs=True)
