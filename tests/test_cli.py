"""The `lightning-compress` app end to end, as a user runs it: real subprocesses, real Hydra, real W&B."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from wandb_records import config, history, run_file, table

pytestmark = pytest.mark.slow

REPORT_KEYS = {
    "accuracy",
    "sparsity",
    "params",
    "nonzero_params",
    "size_bytes_fp32",
    "size_bytes_compressed",
    "compression_ratio",
    "flops_per_sample",
    "val_accuracy",
    "latency_ms_batch1",
    "throughput_per_s",
}


def run_app(
    tmp_path: Path, *args: str, check: bool = True, env: dict[str, str] | None = None, module: str = "train"
) -> subprocess.CompletedProcess:
    """Run an app of lightning_compress.apps (``module="sensitivity"``: the scan) in a subprocess, in ``tmp_path``."""
    env = {**os.environ, "WANDB_MODE": "offline", "COLUMNS": "160", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", f"lightning_compress.apps.{module}", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"app failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_default_job_prunes_to_90_percent_and_reports(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_app(tmp_path, f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false", env={"COLUMNS": "80"})
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report) >= REPORT_KEYS
    assert report["recipe"] == "digits_prune90"
    # The first run: no warning, latency measured (ONNX Runtime is a default dependency), a readable table at 80
    # columns, and the headline at the end.
    warned = [line for line in proc.stderr.splitlines() if "warn" in line.lower() or line.startswith("W1")]
    assert not warned, proc.stderr[-3000:]
    assert report["latency_ms_batch1"] is not None and report["at_target"] is True
    tables = proc.stdout[proc.stdout.index("compression report: digits_prune90") :]
    assert "net.fe…" not in tables and "net.classifier.1 " in tables
    assert max(map(len, tables.splitlines())) <= 80
    last = " ".join(proc.stdout.strip().splitlines()[-3:])
    assert "digits_prune90: test accuracy" in last and "× smaller" in last and "speed 1.00×" in last
    assert abs(report["sparsity"] - 0.9) < 1e-5 and report["accuracy"] >= 0.95
    assert report["size_bytes_compressed"] == (run_dir / "model.deploy.lcz").stat().st_size  # the smallest file
    assert report["size_bytes_artifact"] == (run_dir / "model.lcz").stat().st_size  # the one that loads back
    assert report["compression_ratio"] > 5
    from lightning_compress import load_compressed
    from lightning_compress.tasks import ClassificationModule, SmallCNN

    back = load_compressed(run_dir / "model.lcz", ClassificationModule(SmallCNN((1, 8, 8), 10, width=32, hidden=128)))
    weights = [p for p in back.parameters() if p.dim() > 1]  # the pruned Conv/Linear weights, back from the file
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(zeros - report["sparsity"]) < 1e-6
    from lightning_compress.analysis.report import flops_per_sample
    from lightning_compress.tasks import SmallCNN

    assert report["flops_per_sample"] == flops_per_sample(
        SmallCNN((1, 8, 8), 10, width=32, hidden=128), torch.zeros(1, 1, 8, 8)
    )
    assert {r["name"] for r in report["layers"]} >= {"net.features.0", "net.classifier.3"}
    # the checkpoint holds the pruned weights and the masks
    ckpt = torch.load(report["checkpoint"], weights_only=True)
    assert ckpt["state_dict"]["net.classifier.1.weight"].eq(0).float().mean() > 0.5
    assert any(k.startswith("MagnitudePruning") for k in ckpt["callbacks"])
    # the rich table
    assert "compression report: digits_prune90" in proc.stdout and "compre" in proc.stdout
    assert "net.classifier.1" in proc.stdout
    # the offline W&B run: the resolved config and what was logged
    wandb_run = run_file(run_dir / "wandb")
    logged_config = config(wandb_run)
    assert logged_config["compression"]["pruning"]["final_sparsity"] == 0.9
    assert logged_config["paths"]["output_dir"] == str(run_dir)
    rows = history(wandb_run)
    final = [r for r in rows if "report/accuracy" in r][-1]
    assert final["report/accuracy"] == pytest.approx(report["accuracy"])
    assert final["report/compression_ratio"] == pytest.approx(report["compression_ratio"])
    targets = [r["compress/target_sparsity"] for r in rows if "compress/target_sparsity" in r]
    assert targets[0] < 0.5 and targets[-1] == pytest.approx(0.9)
    # checkpoint selection that respects compression: the best epoch among those after the ramp (end_epoch 20)
    flags = [r["compress/at_target"] for r in rows if "compress/at_target" in r]
    assert flags == [0] * 19 + [1] * 11  # 30 validations; the ramp's last update is the last step of epoch 19
    at_target = [r["val/acc_at_target"] for r in rows if "val/acc_at_target" in r][19:]
    best = report["best_at_target"]
    assert best["val/acc_at_target"] == pytest.approx(max(at_target))
    best_ckpt = torch.load(best["checkpoint"], weights_only=True)
    assert best_ckpt["epoch"] >= 19
    pruned = best_ckpt["state_dict"]["net.classifier.1.weight"]
    assert pruned.eq(0).float().mean() > 0.85


def test_multirun_finishes_one_wandb_run_per_job(tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_app(
        tmp_path, "-m", f"hydra.sweep.dir={sweep_dir}", "compression.pruning.final_sparsity=0.5,0.8",
        "trainer.max_epochs=2", "compression.pruning.end_epoch=1", "trainer.enable_progress_bar=false",
    )  # fmt: skip
    for job, sparsity in (("0", 0.5), ("1", 0.8)):
        report = json.loads((sweep_dir / job / "report.json").read_text())
        assert abs(report["sparsity"] - sparsity) < 1e-5
        assert config(run_file(sweep_dir / job / "wandb"))["compression"]["pruning"]["final_sparsity"] == sparsity


def test_csv_logger_and_other_recipe(tmp_path):
    run_dir = tmp_path / "run"
    run_app(tmp_path, f"hydra.run.dir={run_dir}", "recipe=dense", "logger=csv", "trainer.max_epochs=1")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["recipe"] == "dense" and report["sparsity"] < 0.01
    assert list(run_dir.rglob("metrics.csv")) and not (run_dir / "wandb").exists()


def test_bad_input_fails_before_training(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_app(tmp_path, f"hydra.run.dir={run_dir}", "compression.pruning.final_sparsity=1.5", check=False)
    assert proc.returncode != 0
    assert "`final_sparsity` must be in [0, 1), got 1.5" in proc.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "report.json").exists()


def test_end_epoch_past_max_epochs(tmp_path):
    proc = run_app(tmp_path, f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_epochs=5", check=False)
    assert proc.returncode != 0
    assert "MagnitudePruning(end_epoch=20) is past the end of Trainer(max_epochs=5)" in proc.stderr


def test_unknown_recipe_lists_available(tmp_path):
    proc = run_app(tmp_path, "recipe=prune_everything", check=False)
    assert proc.returncode != 0
    assert "Could not find 'recipe/prune_everything'" in proc.stderr
    assert "digits_prune90" in proc.stderr  # Hydra lists the available options


def test_qat_recipe_reports_float_quantized_and_onnx_parity(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_app(
        tmp_path, f"hydra.run.dir={run_dir}", "recipe=digits_qat_int8", "trainer.max_epochs=4",
        "compression.quantization.start_epoch=1", "compression.quantization.freeze_bn_epoch=3",
        "compression.quantization.freeze_observers_epoch=3", "trainer.enable_progress_bar=false",
    )  # fmt: skip
    report = json.loads((run_dir / "report.json").read_text())
    assert {"accuracy_float", "accuracy_onnx", "onnx_parity", "size_bytes_onnx"} <= set(report)
    assert report["onnx_parity"]["top1_agreement"] >= 0.995 and report["onnx_parity"]["samples"] == 360
    assert abs(report["accuracy_onnx"] - report["accuracy"]) <= 1 / 360 + 1e-9
    assert report["size_bytes_onnx"] == (run_dir / "model.int8.onnx").stat().st_size
    assert report["size_bytes_fp32"] / report["size_bytes_compressed"] > 3.5  # int8 integers in the artifact
    assert "top-1 agreement" in proc.stdout and "ONNX Runtime" in proc.stdout
    logged = [r for r in history(run_file(run_dir / "wandb")) if "report/onnx_parity/top1_agreement" in r]
    assert logged and logged[-1]["report/onnx_parity/top1_agreement"] == report["onnx_parity"]["top1_agreement"]
    qat_metrics = {k for r in history(run_file(run_dir / "wandb")) for k in r if k.startswith("qat/")}
    for prefix in ("qat/weight_error/", "qat/act_scale/", "qat/weight_scale/", "qat/clip_fraction/"):
        assert any(k.startswith(prefix) for k in qat_metrics), prefix
    # the per-layer dashboard table: sparsity, bits, parameters, bytes
    layers = table(run_file(run_dir / "wandb"), "report/layers")
    assert layers["columns"] == ["layer", "type", "params", "non-zeros", "sparsity", "bits", "fp32 size", "packed size"]
    bits = {row[0]: row[5] for row in layers["data"]}
    assert bits["net.features.0"] == bits["net.classifier.3"] == 8 and bits["net.features.1"] == 32
    assert [row[5] for row in layers["data"]] == [row["bits"] for row in report["layers"]]


def test_deep_compression_recipe_end_to_end(tmp_path):
    """Pruning, then QAT, with a teacher: masks hold into the int8 ONNX file, the checkpoint kept is at the target,
    and the W&B run holds the dashboard pieces of all three techniques."""
    run_dir = tmp_path / "run"
    run_app(
        tmp_path, f"hydra.run.dir={run_dir}", "recipe=digits_deep_compression", "trainer.max_epochs=5",
        "compression.pruning.end_epoch=2", "compression.quantization.start_epoch=3",
        "compression.quantization.freeze_bn_epoch=4", "compression.quantization.freeze_observers_epoch=4",
        "compression.distillation.teacher.max_epochs=2", "distillation_baseline=false",
        "compression.quantization.log_every_n_steps=5", "trainer.enable_progress_bar=false",
    )  # fmt: skip
    report = json.loads((run_dir / "report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.9, abs=1e-5)
    assert report["onnx_parity"]["pruned_zeros_kept"] == 1.0 and report["onnx_parity"]["top1_agreement"] >= 0.995
    assert report["compression_ratio"] > 20 and report["accuracy"] > 0.9
    assert torch.load(report["best_at_target"]["checkpoint"], weights_only=True)["epoch"] >= 3  # quantizing by then
    rows = history(run_file(run_dir / "wandb"))
    keys = {k for r in rows for k in r}
    assert {"kd/loss_kd", "kd/loss_task", "compress/sparsity", "compress/target_sparsity", "compress/at_target"} <= keys
    assert any(k.startswith("qat/weight_scale/") for k in keys)
    layers = {row[0]: row for row in table(run_file(run_dir / "wandb"), "report/layers")["data"]}
    assert layers["net.classifier.1"][5] == 8 and layers["net.classifier.1"][4] > 0.85  # bits, sparsity


def test_parity_below_the_stated_minimum_fails_the_job(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_app(
        tmp_path, f"hydra.run.dir={run_dir}", "recipe=digits_qat_int8", "trainer.max_epochs=2",
        "compression.quantization.start_epoch=1", "compression.quantization.calibration_steps=5",
        "onnx_parity_min_agreement=1.01", "logger=none",
    check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "below onnx_parity_min_agreement=1.01" in proc.stderr
    assert (run_dir / "report.json").exists()  # the report is written before the job fails


def test_qat_bad_bits_refused_before_training(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_app(
        tmp_path,
        f"hydra.run.dir={run_dir}",
        "recipe=digits_qat_int8",
        "compression.quantization.weight_bits=1",
        check=False,
    )
    assert proc.returncode != 0 and "`weight_bits` must be an integer from 2 to 8, got 1" in proc.stderr
    assert not (run_dir / "checkpoints").exists()


def test_distillation_recipe_reports_teacher_student_alone_and_distilled(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_app(
        tmp_path, f"hydra.run.dir={run_dir}", "recipe=digits_distill", "trainer.max_epochs=3",
        "compression.distillation.teacher.max_epochs=3", "trainer.enable_progress_bar=false",
    )  # fmt: skip
    report = json.loads((run_dir / "report.json").read_text())
    assert report["accuracy_teacher"] > 0.8
    assert 0 < report["accuracy_student_alone"] <= 1 and 0 < report["accuracy"] <= 1
    assert (run_dir / "teacher.ckpt").exists() and (run_dir / "student_alone" / "report.json").exists()
    assert "distilled student" in proc.stdout
    kd = [r for r in history(run_file(run_dir / "wandb")) if "kd/loss_kd" in r]
    assert kd and all(r["kd/loss_kd"] >= 0 for r in kd)
    # the teacher checkpoint it wrote loads back as the teacher of another run
    report2_dir = tmp_path / "run2"
    run_app(
        tmp_path, f"hydra.run.dir={report2_dir}", "recipe=digits_distill", "trainer.max_epochs=1",
        f"compression.distillation.teacher.checkpoint={run_dir / 'teacher.ckpt'}", "distillation_baseline=false",
        "logger=none",
    )  # fmt: skip
    assert json.loads((report2_dir / "report.json").read_text())["accuracy_teacher"] == pytest.approx(
        report["accuracy_teacher"]
    )


@pytest.mark.parametrize(
    "module, name, says",
    [
        ("train", "lightning-compress", "train a model with the compression callbacks of a recipe"),
        ("sensitivity", "lightning-compress-sensitivity", "prune each\nConv/Linear layer alone"),
    ],
)
def test_help_names_the_app_and_says_how_to_start(tmp_path, module, name, says):
    proc = run_app(tmp_path, "--help", module=module)
    assert proc.stdout.startswith(f"{name}: ") and says in proc.stdout
    assert "Start with `" in proc.stdout and "powered by Hydra" not in proc.stdout


def test_a_job_killed_with_sigterm_resumes_to_the_same_result(tmp_path):
    """SIGTERM mid-epoch (as a cluster's pre-emption sends it): the job stops with the last epoch's checkpoint intact,
    and `ckpt_path=` continues it to the same weights and report as an uninterrupted job."""
    import signal
    import time

    args = [
        "trainer.max_epochs=6",
        "compression.pruning.end_epoch=4",
        "logger=none",
        "trainer.enable_progress_bar=false",
    ]
    whole = tmp_path / "whole"
    run_app(tmp_path, f"hydra.run.dir={whole}", *args)
    killed = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_compress.apps.train", f"hydra.run.dir={killed}", *args],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, weights_only=True)["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and not (killed / "report.json").exists()
    assert "Stopped by SIGTERM" in stdout + stderr and f"Resume with ckpt_path={last}" in stdout + stderr
    stopped = torch.load(last, weights_only=True)  # a usable checkpoint: it loads, at an epoch before the end
    assert 1 <= stopped["epoch"] < 5
    run_app(tmp_path, f"hydra.run.dir={killed}", *args, f"ckpt_path={last}")
    resumed = json.loads((killed / "report.json").read_text())
    expected = json.loads((whole / "report.json").read_text())
    assert resumed["accuracy"] == expected["accuracy"] and resumed["sparsity"] == expected["sparsity"]
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(last, weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("recipe, logger", [("digits_prune90", "csv"), ("digits_qat_int8", "none")])
def test_ddp_spawn_job_reports_the_compressed_model_as_on_one_process(tmp_path, recipe, logger):
    """trainer=ddp is ddp_spawn on 2 processes: Lightning copies only the weights back; the app rebuilds masks and
    quantizers from the run's checkpoint, so the report measures the compressed model (not 0.8978 over every
    parameter, not a float model without quantizers)."""
    run_dir = tmp_path / "run"
    qat = "compression.quantization"
    epochs = ["trainer.max_epochs=4", "compression.pruning.end_epoch=2"] if "prune" in recipe else [
        "trainer.max_epochs=4", f"{qat}.start_epoch=1", f"{qat}.calibration_steps=2", f"{qat}.freeze_bn_epoch=3",
        f"{qat}.freeze_observers_epoch=3",
    ]  # fmt: skip
    proc = run_app(
        tmp_path, f"hydra.run.dir={run_dir}", f"recipe={recipe}", "trainer=ddp", f"logger={logger}", *epochs,
        "trainer.enable_progress_bar=false",
    )  # fmt: skip
    assert "copies only the weights back" in proc.stderr  # said, not silent
    report = json.loads((run_dir / "report.json").read_text())
    if "prune" in recipe:
        assert report["sparsity"] == pytest.approx(0.9, abs=1e-4)
        assert list(run_dir.rglob("metrics.csv"))
    else:
        assert report["onnx_parity"]["top1_agreement"] >= 0.995 and report["accuracy_onnx"] > 0.8
        assert {r["bits"] for r in report["layers"] if r["type"].startswith("QAT")} == {8}


def test_multirun_of_ddp_spawn_jobs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_app(
        tmp_path, "-m", f"hydra.sweep.dir={sweep_dir}", "trainer=ddp", "compression.pruning.final_sparsity=0.5,0.8",
        "trainer.max_epochs=2", "compression.pruning.end_epoch=1", "trainer.enable_progress_bar=false",
    )  # fmt: skip
    for job, sparsity in (("0", 0.5), ("1", 0.8)):
        report = json.loads((sweep_dir / job / "report.json").read_text())
        assert report["sparsity"] == pytest.approx(sparsity, abs=1e-4)
        assert config(run_file(sweep_dir / job / "wandb"))["compression"]["pruning"]["final_sparsity"] == sparsity
