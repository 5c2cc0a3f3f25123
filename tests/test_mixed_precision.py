"""Automatic per-layer weight bits: the quantization scan, the exact choice under a budget, layer_bits.yaml feeding
QuantizationAwareTraining, the sensitivity app's quantization kind (one scan for a multirun over budgets), bad input."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
import yaml
from conftest import make_trainer, small_module
from test_cli import run_app

from lightning_compress import QuantizationAwareTraining
from lightning_compress.analysis.mixed_precision import (
    average_bits_of,
    bits_budget,
    choose_layer_bits,
    quantization_scan,
    quantize_weight_,
    write_layer_bits,
)
from lightning_compress.core.metrics import evaluate_loss_and_accuracy
from lightning_compress.tasks import DigitsDataModule


@pytest.fixture(scope="module")
def trained():
    dm = DigitsDataModule(batch_size=64, seed=0)
    module = small_module()
    make_trainer(None, max_epochs=3).fit(module, datamodule=dm)
    dm.setup("validate")
    return module, dm.val_dataloader()


def test_weights_land_on_a_per_channel_grid_of_the_given_bits():
    torch.manual_seed(0)
    weight = torch.randn(6, 40)
    for bits in (2, 4, 8):
        w = weight.clone()
        quantize_weight_(w, bits)
        for row, original in zip(w, weight, strict=True):
            scale = original.abs().max() / (2 ** (bits - 1) - 1)
            assert torch.allclose(row / scale, (row / scale).round(), atol=1e-4)  # on the grid
            assert len(torch.unique(row)) <= 2**bits - 1
        assert float((w - weight).abs().max()) <= float(weight.abs().max() / (2 ** (bits - 1) - 1)) / 2 + 1e-6


def test_scan_quantizes_one_layer_at_a_time_and_restores_it(trained):
    module, loader = trained
    before = {k: v.clone() for k, v in module.state_dict().items()}
    scan = quantization_scan(module, lambda m: evaluate_loss_and_accuracy(m, loader), bits=[2, 8])
    assert len(scan["rows"]) == 5 * 2
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key
    by = {(r["layer"], r["bits"]): r for r in scan["rows"]}
    # 2-bit weights in the first convolution (288 weights, every one matters) hurt more than 8-bit ones
    assert by[("net.features.0", 2)]["damage"] > by[("net.features.0", 8)]["damage"]
    assert abs(by[("net.features.0", 8)]["damage"]) < 0.01


def _objective(scan, chosen):
    """(predicted damage, −bits used) of a choice, with damages made monotone independently of the library: fewer
    bits never predicted to lose less than more bits, nor less than nothing."""
    rows = {(r["layer"], r["bits"]): r for r in scan["rows"]}
    damage = cost = 0.0
    for pattern, bits in chosen.items():
        layer = pattern.strip("^$")
        damage += max([0.0] + [r["damage"] for (n, b), r in rows.items() if n == layer and b >= bits])
        cost += rows[layer, bits]["params"] * bits
    return round(damage, 12), -cost


def _brute_force(scan, budget_bits):
    layers = list(dict.fromkeys(r["layer"] for r in scan["rows"]))
    options = {n: [r["bits"] for r in scan["rows"] if r["layer"] == n] for n in layers}
    feasible = []
    for combo in itertools.product(*options.values()):
        chosen = {f"^{n}$": b for n, b in zip(layers, combo, strict=True)}
        if -_objective(scan, chosen)[1] <= budget_bits + 1e-9:
            feasible.append(chosen)
    return min(feasible, key=lambda c: _objective(scan, c))


def test_the_choice_is_exact_against_brute_force():
    rng = random.Random(0)
    for _ in range(30):
        rows = []
        for layer in "abcdef":
            params = rng.choice([100, 1000, 5000, 20000])
            damages = [rng.uniform(-0.01, 0.5) for _ in range(3)]  # noisy: not always fewer bits, more loss
            rows += [{"layer": layer, "params": params, "bits": b, "damage": d}
                     for b, d in zip((2, 4, 8), damages, strict=True)]  # fmt: skip
        scan = {"rows": rows}
        for average in (2.5, 3, 4, 6):
            chosen = choose_layer_bits(scan, average_bits=average)
            best = _brute_force(scan, bits_budget(scan, average_bits=average))
            assert _objective(scan, chosen) == _objective(scan, best)  # as good (ties may differ in layout)
            assert average_bits_of(scan, chosen) <= average + 1e-9


def test_budgets_below_the_smallest_bits_are_refused():
    scan = {"rows": [{"layer": "a", "params": 1000, "bits": b, "damage": 0.0} for b in (2, 4, 8)]}
    with pytest.raises(ValueError, match=r"`average_bits`=1.5 is below what the smallest scanned bit-width \(2 bits\)"):
        choose_layer_bits(scan, average_bits=1.5)
    with pytest.raises(ValueError, match=r"`size_bytes`=100 is below .* \(2 bits per weight, 250 bytes for 1,000"):
        choose_layer_bits(scan, size_bytes=100)
    with pytest.raises(ValueError, match=r"Give one budget"):
        choose_layer_bits(scan, average_bits=4, size_bytes=1000)
    assert choose_layer_bits(scan, size_bytes=1000) == {"^a$": 8}


def test_layer_bits_file_feeds_quantization_aware_training(trained, tmp_path):
    module, loader = trained
    scan = quantization_scan(module, lambda m: evaluate_loss_and_accuracy(m, loader), bits=[2, 4, 8])
    chosen = choose_layer_bits(scan, average_bits=4)
    path = write_layer_bits(scan, chosen, tmp_path)["layer_bits"]
    assert yaml.safe_load(path.read_text()) == chosen
    qat = QuantizationAwareTraining(layer_bits=path, start_epoch=0, calibration_steps=2)
    fresh = small_module()
    make_trainer(tmp_path, callbacks=[qat], max_epochs=1, limit_train_batches=4).fit(fresh, DigitsDataModule())
    got = {f"^{n.replace('.', chr(92) + '.')}$": m.weight_quantizer.spec.bits for n, m in fresh.named_modules()
           if hasattr(m, "weight_quantizer")}  # fmt: skip
    assert got == chosen


def test_a_layer_bits_file_naming_unknown_layers_is_refused_before_the_first_step(tmp_path):
    path = tmp_path / "layer_bits.yaml"
    path.write_text(yaml.safe_dump({r"^net\.decoder\.0$": 4}))
    trainer = make_trainer(tmp_path, callbacks=[QuantizationAwareTraining(layer_bits=path)], max_epochs=1)
    with pytest.raises(ValueError, match=r"`layer_bits` pattern '\^net\\\\.decoder\\\\.0\$' matches no selected layer"):
        trainer.fit(small_module(), DigitsDataModule())
    assert trainer.global_step == 0


def test_the_app_refuses_a_budget_below_the_smallest_bits_before_training(tmp_path):
    proc = run_app(tmp_path, "--config-name", "sensitivity", "sensitivity.kind=quantization",
                   "sensitivity.average_bits=1", "logger=none", module="sensitivity", check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "`average_bits`=1 is below what the smallest scanned bit-width (2 bits)" in proc.stderr
    assert "Trainer.fit" not in proc.stderr


@pytest.mark.slow
def test_app_multirun_over_budgets_scans_once_and_writes_layer_bits(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_app(tmp_path, "--config-name", "sensitivity", "-m", f"hydra.sweep.dir={sweep}", "logger=none",
                   "sensitivity.kind=quantization", "sensitivity.average_bits=3,5", "trainer.max_epochs=2",
                   "trainer.enable_progress_bar=false", module="sensitivity")  # fmt: skip
    tight, loose = (json.loads((sweep / j / "quantization_sensitivity.json").read_text()) for j in ("0", "1"))
    assert tight["rows"] == loose["rows"]  # one scan, reused
    assert "Reusing the scan" in proc.stdout + proc.stderr
    assert tight["average_bits"] <= 3 < loose["average_bits"] <= 5
    assert tight["predicted_damage"] >= loose["predicted_damage"]
    assert yaml.safe_load((sweep / "0" / "layer_bits.yaml").read_text()) == tight["layer_bits"]
