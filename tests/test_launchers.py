"""Launchers: local parallel jobs (joblib) for real; the SLURM config down to the sbatch script submitit writes."""

from __future__ import annotations

import json
import os
import stat

import pytest
from test_cli import run_app
from wandb_records import run_file, run_group


@pytest.mark.slow
def test_local_parallel_launcher_runs_jobs_side_by_side(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_app(
        tmp_path, "-m", "launcher=local_parallel", f"hydra.sweep.dir={sweep}",
        "compression.pruning.final_sparsity=0.5,0.8", "trainer.max_epochs=1", "compression.pruning.end_epoch=1",
        "trainer.enable_progress_bar=false",
    )  # fmt: skip
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    for job, sparsity in (("0", 0.5), ("1", 0.8)):
        report = json.loads((sweep / job / "report.json").read_text())
        assert report["sparsity"] == pytest.approx(sparsity, abs=1e-5)
        assert run_group(run_file(sweep / job / "wandb")) == str(sweep)


FAKE_SBATCH = """#!/bin/sh
# Stands in for SLURM's sbatch: keep the script submitit wrote, then refuse it (no cluster here).
cp "$1" "{keep}"
echo "sbatch: error: no cluster on this machine" >&2
exit 1
"""
FAKE_SRUN = "#!/bin/sh\nexit 1\n"  # submitit only checks that srun exists before it calls sbatch


@pytest.mark.slow
def test_slurm_launcher_writes_one_task_per_gpu(tmp_path):
    """The real app, Hydra's submitit launcher and submitit down to `sbatch`, which a stand-in records."""
    bin_dir, keep = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH.format(keep=keep)), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    proc = run_app(
        tmp_path, "-m", "launcher=slurm", "hydra.launcher.partition=gpu", "trainer.devices=4", "trainer.num_nodes=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", "compression.pruning.final_sparsity=0.8,0.9",
        check=False, env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
    )  # fmt: skip
    assert proc.returncode != 0 and "no cluster on this machine" in proc.stderr
    script = keep.read_text()
    for line in ("--partition=gpu", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8",
                 "--time=120", "--mem=64GB", "--array=0-1%2"):  # fmt: skip
        assert f"#SBATCH {line}" in script, line
    assert "srun" in script and "submitit.core._submit" in script
