"""Short runs run every technique's whole path; runs that stop early never leave a technique short silently.

A Lightning user smoke-tests a pipeline with ``fast_dev_run`` / ``overfit_batches`` / a ``max_steps`` debug run before
the long run, and stops long runs with EarlyStopping or ``max_time``. Each test here failed on the main of 2026-12-04
(refused, or stopped under-compressed without a word).
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer, small_module
from lightning.pytorch.callbacks import EarlyStopping

from lightning_compress import (
    CompressionTarget,
    LowRankFactorization,
    MagnitudePruning,
    QuantizationAwareTraining,
    WeightClustering,
    export_onnx,
    load_recipe,
)
from lightning_compress.tasks import DigitsDataModule

X = torch.zeros(2, 1, 8, 8)


@pytest.fixture
def info_lines(caplog):
    caplog.set_level(logging.INFO)
    return lambda: [r.getMessage() for r in caplog.records]


def smoke_trainer(tmp_path, callbacks, **kwargs):
    """A Trainer as a user writes it for the long run, plus a debug flag."""
    defaults = dict(accelerator="cpu", devices=1, max_epochs=30, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


@pytest.mark.parametrize("fast_dev_run", [True, 4])
def test_fast_dev_run_runs_pruning_and_qat_to_their_targets(tmp_path, info_lines, fast_dev_run):
    pruning, qat = MagnitudePruning(final_sparsity=0.9, end_epoch=20), QuantizationAwareTraining()
    module = small_module()
    smoke_trainer(tmp_path, [pruning, qat], fast_dev_run=fast_dev_run).fit(module, DigitsDataModule())
    assert pruning.target_reached and pruning.sparsity() == pytest.approx(0.9, abs=1e-3)
    assert qat.target_reached and pruning.stopped_short is None and qat.stopped_short is None
    export_onnx(module, tmp_path / "m.onnx", X)  # the whole path: the int8 export works after a smoke test
    said = [line for line in info_lines() if "compressed into the run" in line]
    assert len(said) == 2 and all(f"fast_dev_run={fast_dev_run!r}" in line for line in said)
    assert any("MagnitudePruning" in line and "epochs 0 -> 20" in line for line in said)


def test_fast_dev_run_runs_a_shipped_recipe(tmp_path):
    callbacks = load_recipe("digits_qat_int8")
    module = small_module()
    smoke_trainer(tmp_path, callbacks, fast_dev_run=True).fit(module, DigitsDataModule())
    assert all(cb.target_reached for cb in callbacks if hasattr(cb, "target_reached"))
    export_onnx(module, tmp_path / "m.onnx", X)


def test_overfit_batches_runs_pruning_then_clustering(tmp_path):
    pruning, clustering = MagnitudePruning(final_sparsity=0.8, end_epoch=20), WeightClustering(clusters=8)
    smoke_trainer(tmp_path, [pruning, clustering], overfit_batches=1, max_epochs=1, logger=False,
                  enable_checkpointing=False).fit(small_module(), DigitsDataModule())  # fmt: skip
    assert pruning.target_reached and clustering.target_reached
    for name, weight in clustering.weights.items():
        assert len(torch.unique(weight[weight != 0])) <= 8, name


def test_max_steps_debug_run_compresses_the_ramp_with_a_warning(tmp_path):
    low_rank = LowRankFactorization(ratio=2, end_epoch=10)
    with pytest.warns(UserWarning, match=r"LowRankFactorization: max_steps=3 runs 3 optimizer step\(s\).*compressed"):
        make_trainer(tmp_path, callbacks=[low_rank], max_epochs=30, max_steps=3).fit(small_module(),
                                                                                   DigitsDataModule())  # fmt: skip
    assert low_rank.target_reached and low_rank.ratio_reached() >= 2 - 1e-6


def test_a_schedule_past_the_users_own_max_epochs_is_refused_quoting_both(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[MagnitudePruning(end_epoch=20)], max_epochs=10)
    with pytest.raises(ValueError, match=r"MagnitudePruning\(end_epoch=20\) is past the end of Trainer\(max_epochs=10"):
        trainer.fit(small_module(), DigitsDataModule())


def test_fast_dev_run_with_a_compression_target_monitor_that_never_appears(tmp_path):
    callbacks = [MagnitudePruning(end_epoch=20), CompressionTarget(monitor="val/f1")]
    with pytest.raises(KeyError, match=r"CompressionTarget\(monitor='val/f1'\) found no 'val/f1'.*'val/acc'"):
        smoke_trainer(tmp_path, callbacks, fast_dev_run=True).fit(small_module(), DigitsDataModule())


# --------------------------------------------------------------------------- early stops
def never_improves():
    """An EarlyStopping that stops after the second validation (no metric improves by 1.0)."""
    return EarlyStopping("val/acc", mode="max", patience=0, min_delta=1.0)


@pytest.mark.parametrize("finish", [True, False])
def test_early_stop_during_the_ramp_warns_and_finishes_at_the_target(tmp_path, finish):
    pruning = MagnitudePruning(final_sparsity=0.9, end_epoch=4, finish_on_stop=finish)
    trainer = make_trainer(tmp_path, callbacks=[pruning, never_improves()], max_epochs=6)
    with pytest.warns(UserWarning, match=r"MagnitudePruning: training stopped \(EarlyStopping\(monitor='val/acc'.*"
                                         r"before final_sparsity=0.9 was reached \(sparsity 0\.[0-8]"):  # fmt: skip
        trainer.fit(small_module(), DigitsDataModule())
    assert trainer.current_epoch < 4
    short = pruning.stopped_short
    assert short is not None and short["finished"] is finish and short["asked"] == "final_sparsity=0.9"
    if finish:
        assert pruning.target_reached and pruning.sparsity() == pytest.approx(0.9, abs=1e-3)
    else:
        assert not pruning.target_reached and pruning.sparsity() < 0.85


def test_early_stop_before_qat_quantizes_calibrates_and_exports(tmp_path):
    qat = QuantizationAwareTraining(start_epoch=4)
    module = small_module()
    trainer = make_trainer(tmp_path, callbacks=[qat, never_improves()], max_epochs=6)
    with pytest.warns(UserWarning, match=r"before fake quantization was reached \(float \(not started\)\)"):
        trainer.fit(module, DigitsDataModule())
    assert qat.target_reached and all(layer.input_quantizer.initialized for layer in qat.layers.values())
    export_onnx(module, tmp_path / "m.onnx", X)


def test_early_stop_before_clustering_clusters_at_the_end(tmp_path):
    clustering = WeightClustering(clusters=8, start_epoch=4)
    trainer = make_trainer(tmp_path, callbacks=[clustering, never_improves()], max_epochs=6)
    with pytest.warns(UserWarning, match=r"WeightClustering: training stopped .* \(not clustered yet\)"):
        trainer.fit(small_module(), DigitsDataModule())
    assert clustering.target_reached and clustering.stopped_short["now"] == "clustered and frozen"


def test_a_run_that_reaches_the_target_says_nothing(tmp_path, recwarn):
    pruning = MagnitudePruning(final_sparsity=0.5, end_epoch=1)
    make_trainer(tmp_path, callbacks=[pruning], max_epochs=2).fit(small_module(), DigitsDataModule())
    assert pruning.stopped_short is None
    assert not [w for w in recwarn if "training stopped" in str(w.message)]


# --------------------------------------------------------------------------- training in chunks
def test_a_qat_run_continued_to_a_longer_max_epochs_resumes(tmp_path):
    """Fit to 2 epochs, then resume the last checkpoint to 4: the schedules follow the new length (shares of training
    are taken of the new max_epochs; epochs stay epochs), the masks and the ranges carry over."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def callbacks():
        return [MagnitudePruning(final_sparsity=0.8, end_epoch="50%"), QuantizationAwareTraining(calibration_steps=2)]

    first = callbacks()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module = small_module()
    make_trainer(tmp_path, callbacks=[*first, ckpt], max_epochs=2, enable_checkpointing=True).fit(
        module, DigitsDataModule()
    )
    assert first[0].target_reached and first[1].target_reached
    second = callbacks()
    resumed = small_module()
    trainer = make_trainer(tmp_path, callbacks=second, max_epochs=4)
    trainer.fit(resumed, DigitsDataModule(), ckpt_path=ckpt.last_model_path)
    assert trainer.current_epoch == 4 and trainer.global_step > 2 * 19
    assert second[0].sparsity() == pytest.approx(0.8, abs=1e-3) and second[1].target_reached
    assert second[0].structure_final_epoch == 2  # 50 % of the new length
    export_onnx(resumed, tmp_path / "m.onnx", X)


def test_the_headline_says_what_was_reached():
    from lightning_compress.apps.terminal import headline

    short = {"technique": "MagnitudePruning", "reached": "sparsity 0.769", "asked": "final_sparsity=0.9",
             "finished": True, "now": "sparsity 0.900"}  # fmt: skip
    report = {"recipe": "r", "accuracy": 0.9, "compression_ratio": 9.7, "size_bytes_fp32": 754880,
              "size_bytes_compressed": 77516, "throughput_per_s": 300.0, "float_throughput_per_s": 200.0,
              "stopped_short": [short]}  # fmt: skip
    line = headline(report)
    assert line.startswith("r: test accuracy 90.00% · 9.7× smaller (737.2 KiB → 75.7 KiB)")
    assert "int8 1.50× the speed of float" in line
    assert "NOT at target during training: MagnitudePruning stopped at sparsity 0.769 of final_sparsity=0.9" in line
    assert "then brought to sparsity 0.900 with no fine-tuning" in line
