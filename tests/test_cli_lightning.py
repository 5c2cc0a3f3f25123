"""LightningCLI: the callbacks configured in YAML (examples/lightning_cli.yaml), choices listed by --help, and a bad
choice refused by jsonargparse naming the choices and the value."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lightning_compress import MagnitudePruning, QuantizationAwareTraining, export_onnx

pytest.importorskip("jsonargparse")
EXAMPLES = Path(__file__).parents[1] / "examples"


def cli_main():
    spec = importlib.util.spec_from_file_location("lightning_cli_example", EXAMPLES / "lightning_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_the_yaml_example_trains_prunes_and_quantizes(tmp_path):
    cli = cli_main()(["fit", "--config", str(EXAMPLES / "lightning_cli.yaml"),
                      f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])  # fmt: skip
    pruning = next(cb for cb in cli.trainer.callbacks if isinstance(cb, MagnitudePruning))
    qat = next(cb for cb in cli.trainer.callbacks if isinstance(cb, QuantizationAwareTraining))
    assert pruning.target_reached and pruning.sparsity() == pytest.approx(0.8, abs=1e-3)
    assert qat.target_reached
    export_onnx(cli.model, tmp_path / "model.int8.onnx", torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize(
    "callback, choices",
    [
        ("MagnitudePruning", ["--trainer.callbacks.schedule {cubic,linear}",
                              "--trainer.callbacks.criterion {magnitude,random,threshold,taylor,movement}"]),
        ("QuantizationAwareTraining", ["--trainer.callbacks.observer {minmax,lsq}"]),
        ("LowRankFactorization", ["--trainer.callbacks.budget {params,flops}"]),
        ("WeightClustering", ["--trainer.callbacks.init {linear,kmeans++}"]),
    ],
)  # fmt: skip
def test_help_lists_the_choices(capsys, callback, choices):
    with pytest.raises(SystemExit):
        cli_main()(["fit", "--trainer.callbacks.help", f"lightning_compress.{callback}"])
    out = " ".join(capsys.readouterr().out.split())
    for choice in choices:
        assert choice in out


def test_a_bad_choice_is_refused_naming_the_choices_and_the_value(capsys):
    with pytest.raises(SystemExit):
        cli_main()(["fit", "--trainer.callbacks+=lightning_compress.MagnitudePruning",
                    "--trainer.callbacks.schedule=cubik"])  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert "Expected a typing.Literal['cubic', 'linear']. Got value: cubik" in err
