"""Sweeps: the Pareto front (pure) and a real `-m` grid sweep through the app, read back from its files."""

from __future__ import annotations

import json

import pytest
from test_cli import run_app
from wandb_records import config, run_file, run_group, table

from lightning_compress.analysis.pareto import pareto_front


def test_pareto_front_maximises_accuracy_and_minimises_size():
    points = [(0.90, 10.0), (0.95, 20.0), (0.85, 30.0), (0.95, 15.0), (0.99, 50.0), (0.99, 60.0)]
    assert pareto_front(points) == [0, 3, 4]  # sorted by size; (0.95, 20) and (0.99, 60) are dominated
    assert pareto_front([(0.5, 1.0)]) == [0]
    assert pareto_front([]) == []


@pytest.mark.slow
def test_grid_sweep_writes_pareto_and_one_wandb_run_per_trial(tmp_path):
    sweep = tmp_path / "sweep"
    run_app(
        tmp_path, "hparams_search=grid", "compression.pruning.final_sparsity=0.5,0.9,0.98", f"hydra.sweep.dir={sweep}",
        "trainer.max_epochs=2", "compression.pruning.end_epoch=1", "trainer.enable_progress_bar=false",
    )  # fmt: skip
    result = json.loads((sweep / "pareto.json").read_text())
    assert result["objectives"] == {"val_accuracy": "maximize", "size_bytes_compressed": "minimize"}
    assert len(result["trials"]) == 3 and 1 <= len(result["front"]) <= 3
    sizes = [t["size_bytes_compressed"] for t in result["trials"]]
    assert sizes == sorted(sizes, reverse=True)  # more sparsity, smaller artifact
    assert any("compression.pruning.final_sparsity=0.98" in t["overrides"] for t in result["front"])  # the smallest
    assert (sweep / "pareto.png").stat().st_size > 10_000
    groups = {run_group(run_file(sweep / job / "wandb")) for job in ("0", "1", "2")}
    assert groups == {str(sweep)}  # every trial one W&B run, grouped by sweep
    # the sweep's own W&B run, in the same group: trials, front, scatter and the plot
    pareto_run = run_file(sweep / "wandb")
    assert run_group(pareto_run) == str(sweep)
    trials = table(pareto_run, "sweep/trials")
    assert [r[0] for r in trials["data"]] == ["0", "1", "2"]
    assert {r[0] for r in trials["data"] if r[5]} == {t["job"] for t in result["front"]}
    assert [r[0] for r in table(pareto_run, "sweep/front")["data"]] == [t["job"] for t in result["front"]]
    assert list((pareto_run.parent / "files" / "media" / "images").rglob("*.png"))


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["random", "tpe", "cmaes", "nsga2"])
def test_optuna_sweep_per_sampler(tmp_path, sampler):
    sweep = tmp_path / "sweep"
    run_app(
        tmp_path, f"hparams_search={sampler}", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}",
        "trainer.max_epochs=1", "compression.pruning.end_epoch=1", "trainer.enable_progress_bar=false",
    )  # fmt: skip
    result = json.loads((sweep / "pareto.json").read_text())
    assert len(result["trials"]) == 2 and result["front"]
    for trial in result["trials"]:
        assert any(o.startswith("compression.pruning.final_sparsity=") for o in trial["overrides"])
        assert any(o.startswith("module.lr=") for o in trial["overrides"])
    optuna = (sweep / "optimization_results.yaml").read_text()
    assert ("solutions:" in optuna) == (sampler == "nsga2")  # multi-objective: Optuna's own front
    assert ("best_value:" in optuna) == (sampler != "nsga2")
    for job in ("0", "1"):
        logged = run_file(sweep / job / "wandb")
        assert config(logged)["objective"] == ("accuracy_and_size" if sampler == "nsga2" else "accuracy")
        assert run_group(logged) == str(sweep)


@pytest.mark.slow
def test_a_sweep_can_minimise_the_measured_latency(tmp_path):
    sweep = tmp_path / "sweep"
    run_app(
        tmp_path, "hparams_search=nsga2", "objective=accuracy_and_latency", "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}", "trainer.max_epochs=1", "compression.pruning.end_epoch=1", "logger=none",
    )  # fmt: skip
    result = json.loads((sweep / "pareto.json").read_text())
    assert result["objectives"] == {"val_accuracy": "maximize", "latency_ms_batch1": "minimize"}
    assert all(t["latency_ms_batch1"] > 0 for t in result["trials"]) and result["front"]
    for job in ("0", "1"):
        assert (sweep / job / "model.onnx").is_file()  # the float model, checked in ONNX Runtime, then timed


@pytest.mark.slow
def test_sampler_and_objective_mismatch_is_explained(tmp_path):
    proc = run_app(tmp_path, "hparams_search=nsga2", "objective=accuracy", "hydra.sweeper.n_trials=1",
                   f"hydra.sweep.dir={tmp_path / 's'}", "logger=none", check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "hydra.sweeper.direction has 2 direction(s) but objective='accuracy' returns 1 value(s)" in proc.stderr
    assert "use hparams_search=nsga2" in proc.stderr
    assert not (tmp_path / "s" / "0").exists()  # refused by the sweeper, before any trial


class NoTestSplit(dict):
    """A report whose test accuracy cannot be read: a sweep objective that touched it would fail here."""

    def __getitem__(self, key):
        if key == "accuracy":
            raise AssertionError("a sweep objective read the test accuracy")
        return super().__getitem__(key)

    def get(self, key, default=None):
        return self[key] if key in self else default  # noqa: SIM401 - through __getitem__, which guards the key


@pytest.mark.parametrize("best", [{"checkpoint": "c.ckpt", "val/acc_at_target": 0.85}, None])
def test_objectives_never_read_the_test_split(best):
    from lightning_compress.apps.sweeps import objective_values

    report = NoTestSplit(accuracy=1.0, val_accuracy=0.8, size_bytes_compressed=100)
    if best:
        report["best_at_target"] = best
    expected = 0.85 if best else 0.8
    assert objective_values(report, "accuracy") == expected
    assert objective_values(report, "accuracy_and_size") == [expected, 100.0]


def test_the_front_is_chosen_on_validation_and_test_is_only_reported(tmp_path):
    from lightning_compress.analysis.pareto import write_pareto

    # job 0: better on test, worse on validation, same size as job 1; job 2 never reached its target (NaN)
    for job, (test, val) in enumerate([(0.99, 0.80), (0.90, 0.95), (1.0, None)]):
        (tmp_path / str(job)).mkdir()
        report = {"accuracy": test, "val_accuracy": 0.5, "size_bytes_compressed": 100,
                  "best_at_target": {"checkpoint": "x", "val/acc_at_target": val}}  # fmt: skip
        (tmp_path / str(job) / "report.json").write_text(json.dumps(report))
    result = write_pareto(tmp_path)
    assert [t["job"] for t in result["front"]] == ["1"]
    assert [t["test_accuracy"] for t in result["trials"]] == [0.99, 0.90, 1.0]
    assert result["objectives"] == {"val_accuracy": "maximize", "size_bytes_compressed": "minimize"}
