"""Hardening scenarios (issue 10): every QAT option combination exported and checked in ONNX Runtime, and the
scenario tests run, with their outcome, into one table.

    python benchmarks/hardening.py            # writes the `hardening` section of benchmarks/RESULTS.md

1. The export grid: a Conv → BN → ReLU → Conv → Linear → BatchNorm1d → Linear model on digits, every combination of
   weight_symmetric × per_channel × fold_bn × activation_symmetric × observer × quantize_outputs × (8 | 4 bits),
   trained 30 steps with QAT, BatchNorms frozen, exported (export_onnx verifies before it writes) and compared with
   the fake-quantized model on the validation split.
2. The scenario tests of tests/test_hardening.py and the app-level ones of tests/test_cli.py (SIGTERM and resume,
   ddp_spawn jobs, a multirun of ddp_spawn jobs), run with pytest; each row says what the test shows.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from _common import machine, update_results
from torch import nn

from lightning_compress import QATConfig, export_onnx, onnx_parity, prepare_qat
from lightning_compress.tasks import DigitsDataModule
from lightning_compress.tasks.models import BatchNormEverywhere

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = {
    "weight_symmetric": (True, False),
    "per_channel": (True, False),
    "fold_bn": (True, False),
    "activation_symmetric": (False, True),
    "observer": ("minmax", "lsq"),
    "quantize_outputs": (False, True),
    "bits": (8, 4),
}
SCENARIOS = {  # test → (issue point, scenario, behaviour chosen)
    "test_every_qat_option_exports_a_model_that_agrees": (
        "1",
        "every QAT option alone and combined, exported",
        "agrees ≥ 99.5 % (fixed: affine weights, fold_bn=False, Linear→BatchNorm1d, per-tensor scales)",
    ),
    "test_asymmetric_weights_keep_pruned_zeros_exactly": ("1", "pruned zeros with affine weights", "kept exactly"),
    "test_export_refuses_to_write_a_file_that_disagrees": ("1", "a wrong int8 graph", "ExportMismatchError, no file"),
    "test_ddp_spawn_job_reports_the_compressed_model_as_on_one_process": (
        "2",
        "trainer=ddp (ddp_spawn) job: pruning with CSV logger, int8 QAT",
        "callbacks rebuild masks/quantizers "
        "from the checkpoint in the user's process (restore); a warning says so for library users",
    ),
    "test_callbacks_restore_their_state_in_a_process_that_did_not_train": (
        "2",
        "callbacks rebuilt from a checkpoint in a fresh process",
        "masks, quantizers, phase exact",
    ),
    "test_reused_callbacks_compress_the_new_model": (
        "3",
        "the same callbacks, a second model",
        "the new model is compressed",
    ),
    "test_manual_optimization_that_would_be_wrong_is_refused_before_the_first_step": (
        "4",
        "manual optimization: 2 optimizers (pruning, QAT), wrapped KD step",
        "refused before the first step",
    ),
    "test_manual_distillation_through_kd_loss_changes_the_weights": ("4", "manual optimization with kd.loss", "works"),
    "test_transformer_prunes_quantizes_and_exports_and_names_what_it_leaves": (
        "5",
        "TransformerEncoder on digits rows",
        "pruned, QAT, exported (MatMul) with parity; attention kernel weights named",
    ),
    "test_layer_types_that_are_not_compressed_are_named": (
        "5",
        "ConvTranspose, LSTM, Embedding",
        "named in a warning at setup",
    ),
    "test_qat_checkpoint_loads_strict_into_the_plain_and_the_prepared_class": (
        "6",
        "QAT checkpoint into the plain / prepared class",
        "float_state_dict / prepare_qat, strict",
    ),
    "test_settings_that_cannot_take_effect_are_refused": (
        "7",
        "QAT start past training, calibration longer than training, include=[]",
        "refused, argument named",
    ),
    "test_bad_arguments_name_themselves": (
        "8",
        "include=5, seed='abc', averaging_constant='x', per_channel='no'",
        "refused, argument named",
    ),
    "test_export_and_artifact_errors_name_what_was_wrong": (
        "8",
        "export_onnx(numpy), a 6-byte / corrupt .lcz",
        "refused, argument / file named",
    ),
    "test_tied_weights_are_counted_once": ("9", "tied weights, global scope", "counted once: 0.5000 measured"),
    "test_frozen_layers_are_left_dense_with_a_message": ("9", "frozen layer", "left dense, named in a warning"),
    "test_compression_target_with_a_metric_never_logged_fails_before_training": (
        "10",
        "CompressionTarget monitoring a metric never logged",
        "KeyError after the sanity check, no step taken",
    ),
    "test_distillation_under_bf16_true": ("10", "KD with precision='bf16-true'", "works, teacher bit-identical"),
    "test_a_job_killed_with_sigterm_resumes_to_the_same_result": (
        "11",
        "SIGTERM mid-epoch, then ckpt_path=",
        "same weights and report as uninterrupted",
    ),
    "test_multirun_of_ddp_spawn_jobs": (
        "12",
        "multirun of 2 jobs, each ddp_spawn on 2 processes",
        "both finish, own directory and W&B run",
    ),
    "test_sharded_strategies_are_refused_at_setup": ("13", "FSDP (pruning, QAT)", "refused at setup"),
}


#: A largest logit difference below this is float rounding: the two files compute the same function, and a top-1
#: "disagreement" is an exact tie between two classes broken differently.
TIE = 1e-5


def export_grid() -> tuple[int, list[str], float, float, list[str]]:
    dm = DigitsDataModule(batch_size=128, seed=0)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    val = torch.cat([b[0] for b in dm.val_dataloader()])
    failures, ties, worst, largest_diff = [], [], 1.0, 0.0
    combos = list(itertools.product(*OPTIONS.values()))
    with tempfile.TemporaryDirectory() as tmp:
        for values in combos:
            options = dict(zip(OPTIONS, values, strict=True))
            bits = options.pop("bits")
            torch.manual_seed(0)
            model = BatchNormEverywhere()
            prepare_qat(model, QATConfig(**options, weight_bits=bits, activation_bits=bits))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            model.train()
            for _ in range(30):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            model.features[1].eval(), model.head[2].eval()
            model(x)
            model.eval()
            try:
                path = export_onnx(model, Path(tmp) / "m.onnx", val[:64])
                parity = onnx_parity(model, path, [val])
            except Exception as err:  # noqa: BLE001 - every failure is a row of the report
                failures.append(f"{options}, {bits} bits: {type(err).__name__}")
                continue
            agreement, diff = parity["top1_agreement"], parity["max_logit_diff"]
            worst = min(worst, agreement)
            largest_diff = max(largest_diff, diff)
            if agreement < 0.995 and diff > TIE:
                failures.append(f"{options}, {bits} bits: agreement {agreement:.4f}, max logit diff {diff:.3g}")
            elif agreement < 0.995:
                ties.append(f"{options}, {bits} bits: {agreement:.4f} (max logit diff {diff:.1e})")
    return len(combos), failures, worst, largest_diff, ties


def scenario_outcomes() -> dict[str, str]:
    tests = [
        "tests/test_hardening.py",
        "tests/test_cli.py::test_a_job_killed_with_sigterm_resumes_to_the_same_result",
        "tests/test_cli.py::test_ddp_spawn_job_reports_the_compressed_model_as_on_one_process",
        "tests/test_cli.py::test_multirun_of_ddp_spawn_jobs",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *tests],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    outcomes: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        for word in ("PASSED", "FAILED", "ERROR"):
            if line.startswith(word + " "):
                name = line.split("::")[-1].split("[")[0].split(" ")[0]
                previous = outcomes.get(name, "pass")
                outcomes[name] = "pass" if word == "PASSED" and previous == "pass" else "FAIL"
    return outcomes


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    combos, failures, worst, largest_diff, ties = export_grid()
    print(f"export grid: {combos - len(failures)}/{combos} agree; worst {worst:.4f}; failures: {failures}; ties {ties}")
    outcomes = scenario_outcomes()
    rows = [
        f"| {point} | {scenario} | {outcomes.get(test, 'not run')} | {behaviour} | `{test}` |"
        for test, (point, scenario, behaviour) in SCENARIOS.items()
    ]
    body = (
        f"""## Hardening: no silent wrong model, no silently ignored setting

`python benchmarks/hardening.py` — {machine()}.

**Export grid**: every combination of weight_symmetric × per_channel × fold_bn × activation_symmetric × observer ×
quantize_outputs × 8/4 bits ({combos} runs) on a Conv → BN → Conv → Linear → BatchNorm1d → Linear model, 30 QAT steps
on digits, BatchNorms frozen, `export_onnx` (which checks its file in ONNX Runtime before writing it) and
`onnx_parity` on the validation split (270 images): **{combos - len(failures)} of {combos}** compute what the
fake-quantized model computes — top-1 agreement ≥ 99.5 %, or a largest logit difference below {TIE:g} (float rounding;
the differing predictions are exact ties between two classes). Largest logit difference over all runs:
{largest_diff:.2g}; lowest raw top-1 agreement {worst:.4f}.{
            " Below 99.5 % only through ties: " + "; ".join(ties) + "." if ties else ""
        }{" **Failures**: " + "; ".join(failures) if failures else ""}

**Scenarios** (the tests that show them, run by the script with pytest):

| point | scenario | outcome | behaviour | test |
|---|---|:---:|---|---|
"""
        + "\n".join(rows)
        + """

Point 14 (a short pruning ramp) is measured in the step-time section: mask updates at most every 4 steps by default."""
    )
    update_results("hardening", body)


if __name__ == "__main__":
    main()
