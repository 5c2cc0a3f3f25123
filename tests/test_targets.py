"""CompressionTarget: ModelCheckpoint picks the best epoch only among those where the compression target holds."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_trainer, small_module
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_compress import CompressionTarget, KnowledgeDistillation, MagnitudePruning, QuantizationAwareTraining


class History(Callback):
    """Per-epoch values of callback_metrics as ModelCheckpoint saw them (it runs right after this)."""

    def __init__(self, keys):
        self.keys, self.rows = keys, []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.rows.append({k: float(trainer.callback_metrics[k]) for k in self.keys})


def test_best_checkpoint_is_the_best_epoch_at_the_target(tmp_path, digits):
    # 99.5 % sparsity reached at the end of epoch 3: accuracy falls, so the best epoch overall lies before it.
    history = History(["val/acc", "compress/at_target", "val/acc_at_target"])
    at_target = ModelCheckpoint(dirpath=tmp_path, filename="best-at-target", monitor="val/acc_at_target", mode="max")
    plain = ModelCheckpoint(dirpath=tmp_path, filename="best-plain", monitor="val/acc", mode="max")
    pruning = MagnitudePruning(final_sparsity=0.995, end_epoch=3)
    trainer = make_trainer(
        tmp_path, max_epochs=6, enable_checkpointing=True,
        callbacks=[pruning, CompressionTarget("val/acc"), history, at_target, plain],
    )  # fmt: skip
    trainer.fit(small_module(lr=1e-2), datamodule=digits)

    flags = [r["compress/at_target"] for r in history.rows]
    assert flags == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # the ramp's last update is the last step of epoch 2 (0-based)
    assert all(math.isnan(r["val/acc_at_target"]) for r in history.rows[:2])
    assert [r["val/acc_at_target"] for r in history.rows[2:]] == [r["val/acc"] for r in history.rows[2:]]

    best_at_target = max(r["val/acc"] for r in history.rows[2:])
    assert float(at_target.best_model_score) == pytest.approx(best_at_target)
    assert float(plain.best_model_score) > best_at_target  # the plain choice would be a denser epoch
    # The chosen checkpoint really is at the target sparsity.
    state = torch.load(at_target.best_model_path, weights_only=True)["state_dict"]
    weights = [state[f"{n}.weight"] for n in pruning.selected_layers]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(pruning.sparsity(), abs=1e-9) and zeros >= 0.995 - 1e-3


def test_quantization_target_is_its_start(tmp_path, digits):
    history = History(["compress/at_target"])
    qat = QuantizationAwareTraining(start_epoch=2, calibration_steps=0)
    trainer = make_trainer(tmp_path, max_epochs=4, callbacks=[qat, CompressionTarget(), history])
    trainer.fit(small_module(), datamodule=digits)
    assert [r["compress/at_target"] for r in history.rows] == [0.0, 0.0, 1.0, 1.0]


def test_without_a_target_every_epoch_counts(tmp_path, digits):
    teacher = small_module().net
    history = History(["compress/at_target"])
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[KnowledgeDistillation(teacher), CompressionTarget(),
                                                              history])  # fmt: skip
    trainer.fit(small_module(), datamodule=digits)
    assert [r["compress/at_target"] for r in history.rows] == [1.0, 1.0]


class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True  # as EarlyStopping would, before the pruning ramp ends


def test_warns_when_the_target_never_holds(tmp_path, digits):
    callbacks = [MagnitudePruning(end_epoch=3), CompressionTarget(), StopAfterFirstEpoch()]
    trainer = make_trainer(tmp_path, max_epochs=4, callbacks=callbacks)
    with pytest.warns(UserWarning, match="never held"):
        trainer.fit(small_module(), datamodule=digits)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"monitor": ""}, "`monitor` must be the name"),
        ({"mode": "best"}, r"`mode` must be one of \('max', 'min'\), got 'best'"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionTarget(**kwargs)


def test_unknown_monitor_is_named(tmp_path, digits):
    callbacks = [MagnitudePruning(end_epoch=1), CompressionTarget("val/f1")]
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=callbacks)
    with pytest.raises(KeyError, match=r"monitor='val/f1'.*'val/acc'"):
        trainer.fit(small_module(), datamodule=digits)
