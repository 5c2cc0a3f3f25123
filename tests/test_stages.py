"""Stages computed once and reused across a sweep's trials: the store, the teacher, a finished job's report; and the
resumable Optuna study (its storage checks, and a real sweep stopped and continued through the app)."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from test_cli import run_app

from lightning_compress.apps.study import check_storage, search_overrides
from lightning_compress.core.cache import StageCache, digest


def test_a_stage_is_keyed_by_its_settings_in_any_key_order(tmp_path):
    cache = StageCache(tmp_path / "stages")
    path = cache.store("teacher", {"a": 1, "b": {"c": 2}}, lambda p: p.write_text("x"), ".txt")
    assert path.parent == tmp_path / "stages" and path.read_text() == "x"
    assert cache.load("teacher", {"b": {"c": 2}, "a": 1}, lambda p: p.read_text(), ".txt") == "x"
    assert cache.load("teacher", {"a": 2, "b": {"c": 2}}, lambda p: p.read_text(), ".txt") is None
    assert digest({"x": [1, 2]}) != digest({"x": [2, 1]})
    assert not list((tmp_path / "stages").glob(".*.tmp"))  # the temporary file was moved into place


def test_a_corrupt_stage_is_recomputed_with_a_warning_never_used(tmp_path):
    cache = StageCache(tmp_path)
    path = cache.store("job", {"k": 1}, lambda p: p.write_text('{"accuracy": 0.9}'), ".json")
    path.write_text('{"accuracy": 0.')  # cut short, as by a full disk or a killed writer
    with pytest.warns(RuntimeWarning, match=r"cached job stage .*job-.*\.json' is corrupt"):
        assert cache.load("job", {"k": 1}, lambda p: json.loads(p.read_text()), ".json") is None
    assert not path.exists()  # removed, so that the stage is computed and stored again


def test_a_cache_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        StageCache(tmp_path / "f")
    with pytest.raises(ValueError, match="cannot create the stage cache"):
        StageCache(tmp_path / "f" / "stages").store("x", {}, lambda p: p.write_text(""))


def _teacher(tmp_path, cache_dir):
    from lightning_compress.tasks.teacher_training import train_teacher

    model = {"_target_": "lightning_compress.tasks.SmallCNN", "width": 8}
    data = {"_target_": "lightning_compress.tasks.DigitsDataModule"}
    return train_teacher(model, data, max_epochs=1, seed=3, cache_dir=cache_dir)


def test_the_teacher_is_trained_once_per_setting_and_a_corrupt_one_again(tmp_path, monkeypatch):
    import lightning.pytorch as pl

    fits = []
    original = pl.Trainer.fit
    monkeypatch.setattr(pl.Trainer, "fit", lambda self, *a, **k: fits.append(1) or original(self, *a, **k))
    stages = tmp_path / "stages"
    torch.manual_seed(123)
    before = torch.rand(3)  # the caller's random stream must not depend on whether the teacher was cached
    torch.manual_seed(123)
    first = _teacher(tmp_path, stages)
    after_training = torch.rand(3)
    torch.manual_seed(123)
    second = _teacher(tmp_path, stages)
    after_cached = torch.rand(3)
    assert len(fits) == 1  # trained once, then loaded
    assert torch.equal(after_training, before) and torch.equal(after_cached, before)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    [checkpoint] = stages.glob("teacher-*.ckpt")
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="cached teacher stage .* is corrupt"):
        third = _teacher(tmp_path, stages)
    assert len(fits) == 2  # trained again, to the same network (a teacher depends on its settings only)
    for a, b in zip(first.state_dict().values(), third.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_job_whose_settings_already_ran_returns_that_report_without_training(tmp_path, monkeypatch):
    from lightning_compress.apps import train as app
    from lightning_compress.apps.config import compose

    def cfg(out):
        return compose([f"paths.output_dir={tmp_path / out}", f"paths.stages_dir={tmp_path / 'stages'}",
                        "logger=none", "trainer.max_epochs=1", "compression.pruning.end_epoch=1"])  # fmt: skip

    first = app.train(cfg("a"))
    built = []
    monkeypatch.setattr(app, "build", lambda c: built.append(c) or pytest.fail("trained again"))
    second = app.train(cfg("b"))
    assert not built and second["reused_from"].endswith(".json")
    assert {k: v for k, v in second.items() if k != "reused_from"} == first
    assert json.loads((tmp_path / "b" / "report.json").read_text()) == second  # the job's own directory has it
    other = compose([f"paths.output_dir={tmp_path / 'c'}", f"paths.stages_dir={tmp_path / 'stages'}", "logger=none",
                     "trainer.max_epochs=1", "compression.pruning.end_epoch=1", "seed=1"])  # fmt: skip
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        app.train(other)  # another seed is another job


def test_search_overrides_leave_out_what_only_changes_how_a_sweep_runs():
    assert search_overrides(
        [
            "hydra.sweeper.n_trials=20",
            "hydra.sweeper.n_jobs=2",
            "launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.sweep.dir=x",
            "seed=1",
            "+trainer.foo=1",
        ]  # fmt: skip
    ) == ["+trainer.foo=1", "seed=1"]


def test_an_unwritable_storage_is_refused_naming_the_setting(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"hydra.sweeper.storage='sqlite:///.*file/optuna.db'.*cannot be written"):
        check_storage(f"sqlite:///{tmp_path / 'file' / 'optuna.db'}")
    assert check_storage(f"sqlite:///{tmp_path / 'new' / 'optuna.db'}").endswith("optuna.db")
    assert (tmp_path / "new").is_dir()
    assert check_storage(None) is None


def _finished(db) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]


@pytest.mark.slow
def test_a_stopped_sweep_continues_with_the_missing_trials_only(tmp_path):
    args = ["hparams_search=tpe", "trainer.max_epochs=1", "compression.pruning.end_epoch=1", "logger=none"]
    sweep = tmp_path / "multirun" / "digits_prune90-tpe-seed0"  # the default directory: recipe, search, seed
    first = run_app(tmp_path, *args, "hydra.sweeper.n_trials=2")
    assert "0 of 2 trials finished, 2 to run (jobs from #0)" in first.stderr + first.stdout
    assert _finished(sweep / "optuna.db") == 2
    second = run_app(tmp_path, *args, "hydra.sweeper.n_trials=3")
    assert "2 of 3 trials finished, 1 to run (jobs from #2)" in second.stderr + second.stdout
    assert _finished(sweep / "optuna.db") == 3
    assert sorted(p.parent.name for p in sweep.glob("*/report.json")) == ["0", "1", "2"]
    result = json.loads((sweep / "pareto.json").read_text())
    assert [t["job"] for t in result["trials"]] == ["0", "1", "2"]  # the front covers both invocations
    third = run_app(tmp_path, *args, "hydra.sweeper.n_trials=3")
    assert "3 of 3 trials finished, 0 to run" in third.stderr + third.stdout
    changed = run_app(tmp_path, *args[:-1], "logger=csv", "hydra.sweeper.n_trials=3", check=False)
    assert changed.returncode != 0
    assert "was started with the overrides" in changed.stderr and "logger=csv" in changed.stderr


@pytest.mark.slow
def test_a_sensitivity_multirun_trains_and_scans_once(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_app(
        tmp_path, "--config-name", "sensitivity", "-m", f"hydra.sweep.dir={sweep}", "logger=none",
        "trainer.max_epochs=2", "sensitivity.sparsities=[0.5,0.9]", "sensitivity.max_accuracy_drop=0.0,0.5",
        module="sensitivity",
    )  # fmt: skip
    assert len(list((sweep / "stages").glob("dense-*.ckpt"))) == 1
    assert len(list((sweep / "stages").glob("sensitivity-*.json"))) == 1
    assert "Reusing the scan of the same model" in proc.stdout + proc.stderr
    strict, loose = (json.loads((sweep / j / "sensitivity.json").read_text()) for j in ("0", "1"))
    assert strict["rows"] == loose["rows"] and loose["overall_sparsity"] > strict["overall_sparsity"]
