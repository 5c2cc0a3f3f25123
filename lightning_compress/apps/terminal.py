"""The terminal report of the apps: rich tables of what a job measured (per layer, totals, distillation,
quantization). Nothing here computes a number; it only shows the ``report.json`` of a job."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

#: The per-layer report: report.json key → column (rich table and the W&B table `report/layers`).
LAYER_COLUMNS = {
    "name": "layer", "type": "type", "params": "params", "nonzero": "non-zeros", "sparsity": "sparsity",
    "bits": "bits", "bytes": "fp32 size", "packed_bytes": "packed size",
}  # fmt: skip


def _fmt_bytes(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.2f} MiB"


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Print the compression report of :func:`train` as two rich tables: per layer, then the totals."""
    console = console or Console()
    layers = Table(title=f"compression report: {report.get('recipe', '')}", title_justify="left")
    for col in LAYER_COLUMNS.values():
        layers.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for row in report["layers"]:
        layers.add_row(
            row["name"], row["type"], f"{row['params']:,}", f"{row['nonzero']:,}", f"{row['sparsity']:.2%}",
            str(row["bits"]), _fmt_bytes(row["bytes"]), _fmt_bytes(row["packed_bytes"]),
        )  # fmt: skip
    console.print(layers)
    totals = Table(show_header=True)
    for col in ("val accuracy", "test accuracy", "sparsity", "params", "non-zeros", "fp32 size", "compressed size",
                "ratio"):  # fmt: skip
        totals.add_column(col, justify="right")
    val = report.get("val_accuracy")
    totals.add_row(
        "—" if val is None else f"{val:.2%}", f"{report['accuracy']:.2%}", f"{report['sparsity']:.2%}",
        f"{report['params']:,}",
        f"{report['nonzero_params']:,}", _fmt_bytes(report["size_bytes_fp32"]),
        _fmt_bytes(report["size_bytes_compressed"]), f"{report['compression_ratio']:.1f}×",
    )  # fmt: skip
    console.print(totals)
    if "accuracy_teacher" in report:
        kd = Table(title="distillation", title_justify="left")
        for col in ("teacher", "student alone", "distilled student"):
            kd.add_column(col, justify="right")
        teacher = report["accuracy_teacher"]
        teacher_text = ", ".join(f"{a:.2%}" for a in teacher) if isinstance(teacher, list) else f"{teacher:.2%}"
        alone = report.get("accuracy_student_alone")
        kd.add_row(teacher_text, "—" if alone is None else f"{alone:.2%}", f"{report['accuracy']:.2%}")
        console.print(kd)
    if "onnx_parity" in report:
        quant = Table(title="quantization", title_justify="left")
        for col in ("float accuracy", "fake-quant accuracy", "ONNX Runtime accuracy", "top-1 agreement",
                    "max logit diff", "ONNX size"):  # fmt: skip
            quant.add_column(col, justify="right")
        parity = report["onnx_parity"]
        quant.add_row(
            f"{report['accuracy_float']:.2%}", f"{report['accuracy']:.2%}", f"{report['accuracy_onnx']:.2%}",
            f"{parity['top1_agreement']:.2%}", f"{parity['max_logit_diff']:.4f}", _fmt_bytes(report["size_bytes_onnx"]),
        )  # fmt: skip
        console.print(quant)
    if report.get("latency_ms_batch1") is not None:
        speed = Table(title=f"speed (ONNX Runtime, {report['latency_threads']} threads, {report['latency_onnx']})",
                      title_justify="left")  # fmt: skip
        for col in ("params", "FLOPs / sample", "batch 1 (ms)", f"batch {report['throughput_batch']} (samples/s)"):
            speed.add_column(col, justify="right")
        low, high = report["latency_ms_batch1_range"]
        slow, fast = report["throughput_per_s_range"]
        speed.add_row(
            f"{report['params']:,}", f"{report['flops_per_sample']:,}",
            f"{report['latency_ms_batch1']:.3f} ({low:.3f}–{high:.3f})",
            f"{report['throughput_per_s']:,.0f} ({slow:,.0f}–{fast:,.0f})",
        )  # fmt: skip
        if compact := report.get("compact"):
            speed.add_row(
                f"{compact['params']:,} (compact)", f"{compact['flops_per_sample']:,}",
                "—" if compact.get("latency_ms_batch1") is None else f"{compact['latency_ms_batch1']:.3f}",
                "—" if compact.get("throughput_per_s") is None else f"{compact['throughput_per_s']:,.0f}",
            )  # fmt: skip
        console.print(speed)
