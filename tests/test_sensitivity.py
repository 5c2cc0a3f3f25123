"""Sensitivity scan: per-layer pruning alone, targets that MagnitudePruning takes, the command and a multirun."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import make_trainer, small_module
from test_cli import run_app
from wandb_records import run_file

from lightning_compress import MagnitudePruning
from lightning_compress.analysis.sensitivity import (
    layer_pattern,
    layer_sparsity_from_scan,
    overall_sparsity,
    sensitivity_scan,
    write_scan,
)
from lightning_compress.core.metrics import evaluate_accuracy as accuracy


@pytest.fixture(scope="module")
def trained():
    from lightning_compress.tasks import ClassificationModule, DigitsDataModule, SmallCNN

    dm = DigitsDataModule(batch_size=64, seed=0)
    module = ClassificationModule(SmallCNN((1, 8, 8), 10), lr=1e-2)  # the app's default model
    make_trainer(None, max_epochs=4).fit(module, datamodule=dm)
    dm.setup("validate")
    return module, dm.val_dataloader()


def test_scan_prunes_one_layer_at_a_time_and_restores_it(trained):
    module, loader = trained
    before = {k: v.clone() for k, v in module.state_dict().items()}
    seen = []

    def evaluate(m):
        zeros = {n: float(p.eq(0).float().mean()) for n, p in m.named_parameters() if n.endswith("weight")}
        seen.append([n for n, z in zeros.items() if z > 0.4])  # the layers pruned during this evaluation
        return accuracy(m, loader)

    scan = sensitivity_scan(module, evaluate, [0.5, 0.9, 0.98])
    layers = ["net.features.0", "net.features.3", "net.features.7", "net.classifier.1", "net.classifier.3"]
    assert [r["layer"] for r in scan["rows"]] == [n for n in layers for _ in range(3)]
    assert seen[0] == [] and all(s == [f"{r['layer']}.weight"] for s, r in zip(seen[1:], scan["rows"], strict=True))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # left as it was
    assert scan["baseline"] == accuracy(module, loader)
    by = {(r["layer"], r["sparsity"]): r for r in scan["rows"]}
    # what a sensitivity scan is for: the wide fully connected layer takes 90 %, the first convolution does not
    assert by[("net.classifier.1", 0.9)]["drop"] <= 0.02 < by[("net.features.0", 0.9)]["drop"]

    targets = layer_sparsity_from_scan(scan, 0.02)
    assert set(targets) == {layer_pattern(n) for n in layers}
    for name in layers:
        chosen = targets[layer_pattern(name)]
        assert all(by[(name, s)]["drop"] <= 0.02 for s in (0.5, 0.9, 0.98) if s <= chosen)
        assert chosen == 0.98 or by[(name, min(s for s in (0.5, 0.9, 0.98) if s > chosen))]["drop"] > 0.02
    assert targets[layer_pattern("net.classifier.1")] > targets[layer_pattern("net.features.0")]
    looser = layer_sparsity_from_scan(scan, 0.5)
    assert overall_sparsity(scan, looser) >= overall_sparsity(scan, targets)


def test_targets_file_feeds_magnitude_pruning(trained, tmp_path, digits):
    module, loader = trained
    scan = sensitivity_scan(module, lambda m: accuracy(m, loader), [0.5, 0.9], include="classifier")
    paths = write_scan(scan, layer_sparsity_from_scan(scan, 0.02), tmp_path)
    assert json.loads(paths["json"].read_text())["layer_sparsity"] == yaml.safe_load(paths["targets"].read_text())
    assert paths["plot"].stat().st_size > 5_000
    targets = yaml.safe_load(paths["targets"].read_text())
    pruning = MagnitudePruning(layer_sparsity=paths["targets"], end_epoch=1, include="classifier")
    make_trainer(tmp_path, max_epochs=1, callbacks=[pruning]).fit(small_module(), datamodule=digits)
    for name, measured in pruning.layer_sparsities().items():
        assert measured == pytest.approx(targets[layer_pattern(name)], abs=1e-3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: sensitivity_scan(m, lambda _: 1.0, []), "`sparsities` must be a non-empty list of numbers in"),
        (lambda m: sensitivity_scan(m, lambda _: 1.0, [0.5, 1.0]), r"got \[0.5, 1.0\]"),
        (lambda m: sensitivity_scan(m, lambda _: 1.0, [0.6], granularity="2:4"), r"numbers in \(0, 0.5\]"),
        (lambda m: sensitivity_scan(m, lambda _: 1.0, [0.5], include="nope"), "`include` pattern 'nope' matches no"),
        (
            lambda m: layer_sparsity_from_scan({"rows": []}, -0.1),
            r"`max_accuracy_drop` must be a number in \[0, 1\), got -0.1",
        ),
        (lambda m: MagnitudePruning(layer_sparsity="missing.yaml"), "`layer_sparsity` file 'missing.yaml' does not"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        call(small_module())


@pytest.mark.slow
def test_command_and_multirun(tmp_path):
    run_dir = tmp_path / "scan"
    proc = run_app(
        tmp_path, "--config-name", "sensitivity", f"hydra.run.dir={run_dir}", "trainer.max_epochs=3",
        "sensitivity.sparsities=[0.5,0.9]", "trainer.enable_progress_bar=false", module="sensitivity",
    )  # fmt: skip
    result = json.loads((run_dir / "sensitivity.json").read_text())
    assert len(result["rows"]) == 10 and "compression.pruning.layer_sparsity=" in proc.stdout
    tables = list((run_file(run_dir / "wandb").parent / "files" / "media" / "table").rglob("*.table.json"))
    assert tables
    assert json.loads(tables[0].read_text())["columns"] == ["layer", "params", "sparsity", "accuracy", "drop"]

    # the targets drive a pruning run of the main app
    prune_dir = tmp_path / "prune"
    run_app(
        tmp_path, f"hydra.run.dir={prune_dir}", f"compression.pruning.layer_sparsity={run_dir / 'layer_sparsity.yaml'}",
        "trainer.max_epochs=2", "compression.pruning.end_epoch=1", "logger=none", "trainer.enable_progress_bar=false",
    )  # fmt: skip
    checkpoint = json.loads((prune_dir / "report.json").read_text())["checkpoint"]
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    for pattern, target in result["layer_sparsity"].items():
        name = pattern.strip("^$").replace("\\", "")
        assert float(state[f"{name}.weight"].eq(0).float().mean()) == pytest.approx(target, abs=2e-3)

    # a multirun over the tolerance, from the dense checkpoint of a training run (no retraining)
    dense = tmp_path / "dense"
    run_app(tmp_path, "recipe=dense", f"hydra.run.dir={dense}", "trainer.max_epochs=3", "logger=none",
            "trainer.enable_progress_bar=false")  # fmt: skip
    sweep = tmp_path / "sweep"
    run_app(tmp_path, "--config-name", "sensitivity", "-m", f"hydra.sweep.dir={sweep}", "logger=none",
            f"sensitivity.checkpoint={dense / 'checkpoints' / 'last.ckpt'}", "sensitivity.max_accuracy_drop=0.0,0.5",
            module="sensitivity")  # fmt: skip
    strict, loose = (json.loads((sweep / j / "sensitivity.json").read_text()) for j in ("0", "1"))
    assert strict["baseline"] == loose["baseline"]  # the same loaded model
    assert loose["overall_sparsity"] > strict["overall_sparsity"]
