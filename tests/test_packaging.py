"""`pip install .` gives a working app: the wheel carries the configs and the recipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_configs_and_recipes_and_runs_outside_the_repo(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir)]
    subprocess.run([*build, str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheel_dir.glob("lightning_compress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped_recipes = {
        Path(n).name for n in names if n.startswith("lightning_compress/recipes/") and n.endswith(".yaml")
    }
    assert shipped_recipes == {p.name for p in (ROOT / "recipes").glob("*.yaml")} and len(shipped_recipes) > 5
    assert "lightning_compress/conf/config.yaml" in names
    assert "lightning_compress/conf/compression/magnitude_pruning.yaml" in names
    assert "hydra_plugins/lightning_compress_sweeper/__init__.py" in names  # the resumable sweeper, where Hydra looks
    assert "hydra_plugins/lightning_compress_recipes/__init__.py" in names  # what makes recipes/ the `recipe` group
    assert "lightning_compress/py.typed" in names  # typed package (PEP 561)
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names

    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target), "WANDB_MODE": "offline"}
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", "import lightning_compress, sys; print(lightning_compress.__file__); "
         "sys.argv[0] = 'lightning-compress'; from lightning_compress.apps.train import main; main()",
         f"hydra.run.dir={run_dir}", "trainer.max_epochs=2", "compression.pruning.end_epoch=1", "logger=none",
         "trainer.enable_progress_bar=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith(str(target))  # the installed copy, not the checkout
    assert json.loads((run_dir / "report.json").read_text())["recipe"] == "digits_prune90"

    # an Optuna sweep from the installed copy: the shipped sweeper plugin stores its study in the sweep directory
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv[0] = 'lightning-compress'; "
         "from lightning_compress.apps.train import main; main()", "hparams_search=tpe", "hydra.sweeper.n_trials=1",
         f"hydra.sweep.dir={sweep}", "trainer.max_epochs=1", "compression.pruning.end_epoch=1", "logger=none",
         "latency=null", "trainer.enable_progress_bar=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sweep / "optuna.db").is_file() and (sweep / "0" / "report.json").is_file()
