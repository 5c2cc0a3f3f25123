"""Speed and size on models no one here wrote (issue 19, item 5): torchvision CNNs, random weights, 96×96 inputs.

Per model, in one process and one ONNX Runtime: the fp32 file (``export_float_onnx``), our default QAT export
(``prepare_qat`` with ``QATConfig()``, 3 epochs of SGD on 8 batches with fixed random labels — so that the ranges
are observed and the logits are not near-tied, which a random network's are — then ``export_onnx``, which checks the
file in ONNX Runtime), and the strongest peer — ONNX Runtime's own ``quant_pre_process`` +
``quantize_static`` of the same fp32 file (QDQ, per-channel int8 weights, uint8 activations) calibrated on the same 8
batches. All graph optimisations, 2 intra-op threads, batch 1 and batch 16, interleaved rounds: the median over the
rounds of each round's median call time, and the speed-up over fp32 (median, lowest–highest round). The optimised
graph's kernels say how much of the model runs in integers. Goal: ours at least as fast as the peer on every model;
the int8 file at most 0.3× of the fp32 file.

Then BERT (Hugging Face ``BertForSequenceClassification``, random weights, hidden 256, 4 layers of 4 heads,
intermediate 1024, vocabulary 1000, 64 tokens): our QAT export with the embeddings (``include=["@Linear",
"@Embedding"]``; the same short QAT run on fixed labels) against ONNX Runtime's own int8 of its fp32 file, both ways
it offers — ``quantize_static`` (calibrated on the same 8 batches) and ``quantize_dynamic`` (int8 weights, activations
quantized on the fly: its recommendation for transformers). Goal: ours at least as fast as the faster of the two.

Then channel groups (``prune_(granularity="channel", round_to=8)``, share of channels chosen for about 2× fewer
FLOPs) and ``export_compact`` on resnet18 and mobilenet_v2: the compact fp32 network against the dense one (goal
≥ 1.6× faster). Needs torchvision (``pip install -e ".[zoo]"``, beside torch's CUDA build; runs on the CPU).

    python benchmarks/zoo.py          # writes the `zoo` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

import onnxruntime as ort
import torch
from _common import interleaved_ort_medians, machine, update_results
from ort_latency import kernel_summary, ort_static_int8

from lightning_compress import QATConfig, export_compact, export_onnx, prepare_qat, prune_
from lightning_compress.analysis.latency import ort_session
from lightning_compress.analysis.report import flops_per_sample
from lightning_compress.export.onnx import export_float_onnx

SIZE = 96
EPOCHS = 3
MODELS = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "densenet121"]
PEER, OURS = "ONNX Runtime quantize_static (peer)", "ours: QAT export (default)"
COMPACT = {"resnet18": 0.3, "mobilenet_v2": 0.3}  # share of channels by group (about 2x fewer FLOPs; measured below)
TOKENS, VOCABULARY = 64, 1000
DYNAMIC = "ONNX Runtime quantize_dynamic (peer)"


def batches(n: int = 8, size: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(size, 3, SIZE, SIZE, generator=generator) for _ in range(n)]


def build(name: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10).eval()


def int8_files(
    name: str, model: torch.nn.Module, data: list[torch.Tensor], config: QATConfig, tmp: Path
) -> dict[str, Path]:
    """The fp32 file of ``model``, ONNX Runtime's ``quantize_static`` of it calibrated on ``data`` (the peer), and our
    export after a short QAT run (``config``) on ``data`` with fixed labels: ranges observed, and logits no longer
    near-tied (a random network's are)."""
    paths = {"fp32": export_float_onnx(model, tmp / f"{name}-fp32.onnx", data[0][:4])}
    paths[PEER] = ort_static_int8(paths["fp32"], tmp / f"{name}-peer.onnx", [(x, None) for x in data], len(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_qat(model, config)
        model.train()
        labels = torch.randint(0, 10, (len(data), len(data[0])), generator=torch.Generator().manual_seed(1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for _ in range(EPOCHS):
            for x, y in zip(data, labels, strict=True):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
        model.eval()
        paths[OURS] = export_onnx(model, tmp / f"{name}-ours.onnx", data[0])
    return paths


class Logits(torch.nn.Module):
    """A Hugging Face classifier as token ids → logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=ids).logits


def bert() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCABULARY, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=1024, max_position_embeddings=TOKENS, num_labels=10)  # fmt: skip
    return Logits(transformers.BertForSequenceClassification(config)).eval()


def bert_files(tmp: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    generator = torch.Generator().manual_seed(0)
    data = [torch.randint(0, VOCABULARY, (16, TOKENS), generator=generator) for _ in range(8)]
    paths = int8_files("bert", bert(), data, QATConfig(include=["@Linear", "@Embedding"]), tmp)
    pre = tmp / "bert-peer.pre.onnx"  # written by ort_static_int8's pre-processing
    paths[DYNAMIC] = tmp / "bert-dynamic.onnx"
    quantize_dynamic(str(pre), str(paths[DYNAMIC]), per_channel=True, weight_type=QuantType.QInt8)
    return {k: paths[k] for k in ("fp32", PEER, DYNAMIC, OURS)}  # the peers first, as in the table


def compact_files(name: str, share: float, tmp: Path) -> tuple[dict[str, Path], float]:
    x = batches(1, 4)[0]
    model = build(name)
    dense_flops = flops_per_sample(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_(model, final_sparsity=share, granularity="channel", round_to=8, example_input=x)
        compact = export_compact(model, x)
    ratio = dense_flops / flops_per_sample(compact, x)
    return {
        "dense fp32": export_float_onnx(build(name), tmp / f"{name}-dense.onnx", x),
        f"compact fp32 ({share:.0%} of channels by group)": export_float_onnx(compact, tmp / f"{name}-compact.onnx", x),
    }, ratio


def timed(name: str, paths: dict[str, Path], shape: tuple[int, ...], args: argparse.Namespace, timing: tuple,
          tmp: Path, vocabulary: int = 0) -> tuple[list[str], dict, float]:  # fmt: skip
    """Every file's row (speed against fp32, size, ONNX Runtime's kernels), the rounds' medians, and the fp32 file's
    size."""
    sessions = {k: ort_session(p, args.threads, tmp / f"{p.stem}.opt.onnx") for k, p in paths.items()}
    rounds = interleaved_ort_medians(sessions, args.rounds, shape, batches=timing, vocabulary=vocabulary)
    fp32_bytes = paths["fp32"].stat().st_size
    rows = []
    for kind, path in paths.items():
        cells = " | ".join(cell(rounds[kind, b], rounds["fp32", b], b) for b, _ in timing)
        kernels = kernel_summary(tmp / f"{path.stem}.opt.onnx")
        rows.append(f"| {name} | {kind} | {cells} | {path.stat().st_size / fp32_bytes:.2f}× | {kernels} |")
        print(rows[-1], flush=True)
    return rows, rounds, fp32_bytes


def verdict(paths: dict[str, Path], rounds: dict, peer: str, fp32_bytes: float, against: str = "") -> str:
    """Our int8 against ``peer`` at batch 1 (its time over ours, median of the rounds), and the int8 file's size."""
    ratio = statistics.median(p / o for p, o in zip(rounds[peer, 1], rounds[OURS, 1], strict=True))
    return (f"{ratio:.2f}×{against} ({'met' if ratio >= 1 else 'missed'}; int8 file "
            f"{paths[OURS].stat().st_size / fp32_bytes:.2f}× of fp32)")  # fmt: skip


def cell(times: list[float], base: list[float], batch: int) -> str:
    speedups = [b / t for b, t in zip(base, times, strict=True)]
    return (f"{statistics.median(times) * 1e3:.{2 if batch == 1 else 1}f} | "
            f"{statistics.median(speedups):.2f}× ({min(speedups):.2f}–{max(speedups):.2f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=[*MODELS, "bert"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows, compact_rows, verdicts, bert_rows, bert_verdict = [], [], [], [], ""
    timing = ((1, 30), (16, 3))
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for name in [m for m in args.models if m != "bert"]:
            paths = int8_files(name, build(name), batches(), QATConfig(), tmp)
            model_rows, rounds, fp32_bytes = timed(name, paths, (3, SIZE, SIZE), args, timing, tmp)
            rows += model_rows
            verdicts.append(f"{name} {verdict(paths, rounds, PEER, fp32_bytes)}")
        if "bert" in args.models:
            paths = bert_files(tmp)
            bert_rows, rounds, fp32_bytes = timed("bert", paths, (TOKENS,), args, timing, tmp, VOCABULARY)
            best = min((PEER, DYNAMIC), key=lambda k: statistics.median(rounds[k, 1]))
            bert_verdict = verdict(paths, rounds, best, fp32_bytes, f" against {best.split(' (')[0]}, the faster peer")
        for name, share in COMPACT.items():
            if name not in args.models:
                continue
            paths, ratio = compact_files(name, share, tmp)
            sessions = {k: ort_session(p, args.threads) for k, p in paths.items()}
            rounds = interleaved_ort_medians(sessions, args.rounds, (3, SIZE, SIZE), batches=timing)
            base = next(iter(paths))
            for kind in paths:
                cells = " | ".join(cell(rounds[kind, b], rounds[base, b], b) for b, _ in timing)
                flops = "1.00×" if kind == base else f"{ratio:.2f}× fewer"
                compact_rows.append(f"| {name} | {kind} | {flops} | {cells} |")
                print(compact_rows[-1], flush=True)
    body = (
        f"""## The zoo: int8 and compact speed on torchvision CNNs (random weights)

`python benchmarks/zoo.py` — torchvision models with random weights, {SIZE}×{SIZE} inputs, onnxruntime
{ort.__version__}, all graph optimisations, {args.threads} intra-op threads, {args.rounds} interleaved rounds: median
call time (ms) and speed-up over the same model's fp32 file (median, lowest–highest round). The peer is ONNX Runtime's
own `quant_pre_process` + `quantize_static` of the same fp32 file, calibrated on the same 8 batches our QAT observed.
Goal: ours at least as fast as the peer; the int8 file ≤ 0.3× of the fp32 file. Machine: {machine()}.

| model | file | batch 1 (ms) | vs fp32 | batch 16 (ms) | vs fp32 | size vs fp32 | kernels (ORT's optimised graph) |
|---|---|---:|---:|---:|---:|---:|---|
"""
        + "\n".join(rows)
        + f"""

Our int8 against the peer at batch 1 (its time over ours, median of the rounds; goal ≥ 1): {"; ".join(verdicts)}.

Channel groups + `export_compact` (goal: ≥ 1.6× faster than dense at about 2× fewer FLOPs):

| model | network | FLOPs | batch 1 (ms) | vs dense | batch 16 (ms) | vs dense |
|---|---|---:|---:|---:|---:|---:|
"""
        + "\n".join(compact_rows)
    )
    if rows:
        update_results("zoo", body)
    if bert_rows:
        update_results(
            "zoo_bert",
            f"""## The zoo: BERT int8 against ONNX Runtime's own int8 (random weights)

`python benchmarks/zoo.py --models bert` — Hugging Face `BertForSequenceClassification` from a config (hidden 256, 4
layers of 4 heads, intermediate 1024, vocabulary {VOCABULARY}), random weights, {TOKENS} tokens, onnxruntime
{ort.__version__}, {args.threads} intra-op threads, {args.rounds} interleaved rounds: median call time (ms) and
speed-up over fp32 (median, lowest–highest round). Ours: `QATConfig(include=["@Linear", "@Embedding"])`, a short QAT
run on fixed labels, `export_onnx`. Peers: ONNX Runtime's `quantize_static` (QDQ, calibrated on the same 8 batches)
and `quantize_dynamic` of the same fp32 file. Machine: {machine()}.

| model | file | batch 1 (ms) | vs fp32 | batch 16 (ms) | vs fp32 | size vs fp32 | kernels (ORT's optimised graph) |
|---|---|---:|---:|---:|---:|---:|---|
"""
            + "\n".join(bert_rows)
            + f"\n\nOurs against the faster peer at batch 1 (its time over ours; goal ≥ 1): {bert_verdict}.",
        )


if __name__ == "__main__":
    main()
