"""Every built-in Lightning logger takes the techniques' metrics and tables: names valid everywhere (MLflow's file
store makes a folder of every ``/``, so no key may also be a folder of another), tables through each logger's own API.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import make_trainer, small_module
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from lightning_compress import LowRankFactorization, MagnitudePruning, QuantizationAwareTraining, WeightClustering
from lightning_compress.tasks import DigitsDataModule
from lightning_compress.trainer.tables import log_table


def techniques():
    return [
        MagnitudePruning(final_sparsity=0.5, end_epoch=1, include="features"),
        LowRankFactorization(ratio=2, end_epoch=1, include="classifier"),
        WeightClustering(clusters=8, include="features"),
        QuantizationAwareTraining(start_epoch=1, calibration_steps=2, log_every_n_steps=5),
    ]


def fit_with(logger, tmp_path):
    trainer = make_trainer(tmp_path, callbacks=techniques(), max_epochs=2, logger=logger, log_every_n_steps=5)
    trainer.fit(small_module(), DigitsDataModule())
    return trainer


def test_no_metric_name_is_the_folder_of_another(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    fit_with(logger, tmp_path)
    with open(logger.experiment.metrics_file_path) as f:
        names = next(csv.reader(f))
    assert any(n.startswith("compress/layer_sparsity/") for n in names) and "compress/sparsity" in names
    folders = [(a, b) for a in names for b in names if b.startswith(a + "/")]
    assert not folders, folders


def test_mlflow_file_store_gets_metrics_and_tables_as_run_artifacts(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    logger = MLFlowLogger(experiment_name="compress", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    fit_with(logger, tmp_path)  # crashed with NotADirectoryError on compress/sparsity/<layer>
    run = logger.experiment.get_run(logger.run_id)
    assert "compress/sparsity" in run.data.metrics and "compress/layer_sparsity/net.features.0" in run.data.metrics
    artifacts = {a.path for a in logger.experiment.list_artifacts(logger.run_id, "tables/compress")}
    assert artifacts == {"tables/compress/layers.csv", "tables/compress/ranks.csv", "tables/compress/clusters.csv"}
    text = Path(logger.experiment.download_artifacts(logger.run_id, "tables/compress/layers.csv")).read_text()
    assert text.splitlines()[0] == "layer,type,params,nonzero,sparsity,bytes"
    assert not (tmp_path / "tables").exists()  # nothing written beside the run, where the next run would overwrite it


def test_tensorboard_gets_tables_as_text_and_csv_in_its_version_folder(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    fit_with(logger, tmp_path)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = events.Tags()
    assert {"compress/layers/text_summary", "compress/ranks/text_summary"} <= set(tags["tensors"])
    assert "compress/sparsity" in tags["scalars"]
    assert (tmp_path / "tb" / "version_0" / "tables" / "compress__layers.csv").is_file()


def test_csv_logger_tables_beside_its_metrics(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    fit_with(logger, tmp_path)
    for key in ("compress__layers", "compress__ranks", "compress__clusters"):
        assert (tmp_path / "csv" / "version_0" / "tables" / f"{key}.csv").is_file()


def test_wandb_gets_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    fit_with(logger, tmp_path)
    logger.experiment.finish()
    for key in ("layers", "ranks", "clusters"):
        assert list(tmp_path.rglob(f"files/media/table/compress/{key}_*.table.json")), key


class NoTables(Logger):
    """A logger with scalars only: no table API, no log_dir."""

    name, version = "no_tables", 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_a_logger_that_cannot_store_tables_gets_a_csv_file_and_a_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"NoTables has no table API and no log_dir: the table 'compress/layers' is"):
        paths = log_table([NoTables()], "compress/layers", ["a", "b"], [[1, 2]], tmp_path)
    assert paths == [tmp_path / "tables" / "compress__layers.csv"] and paths[0].read_text() == "a,b\n1,2\n"
    with pytest.raises(ValueError, match=r"NoTables stores no table and has no log_dir.*pass fallback_dir"):
        log_table([NoTables()], "compress/layers", ["a", "b"], [[1, 2]])
