"""The terminal report of the apps: rich tables of what a job measured (per layer, totals, distillation,
quantization). Nothing here computes a number; it only shows the ``report.json`` of a job."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

#: The per-layer report: report.json key → column (rich table and the W&B table `report/layers`).
LAYER_COLUMNS = {
    "name": "layer", "type": "type", "params": "params", "nonzero": "non-zeros", "sparsity": "sparsity",
    "bits": "bits", "bytes": "fp32 size", "packed_bytes": "packed size",
}  # fmt: skip


#: Layer names longer than this are shortened from the left ("…features.3.conv2"): the end names the layer.
NAME_WIDTH = 22


def _shorten_left(name: str, width: int) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def headline(report: dict[str, Any]) -> str:
    """The line a job ends with: accuracy, size ×, speed × (each as measured, with what it compares), and whether
    every technique reached its target."""
    parts = [f"test accuracy {report['accuracy']:.2%}"]
    parts.append(
        f"{report['compression_ratio']:.1f}× smaller ({_fmt_bytes(report['size_bytes_fp32'])} → "
        f"{_fmt_bytes(report['size_bytes_compressed'])})"
    )
    compact, fast = report.get("compact") or {}, report.get("throughput_per_s")
    if compact.get("throughput_per_s") and fast:
        parts.append(f"compact network {compact['throughput_per_s'] / fast:.2f}× the speed of the dense one")
    elif report.get("float_throughput_per_s") and fast:
        parts.append(f"int8 {fast / report['float_throughput_per_s']:.2f}× the speed of float (ONNX Runtime)")
    elif fast:
        parts.append("speed 1.00× (zeros inside dense layers run at dense speed: channel groups or int8 are faster)")
    line = f"{report.get('recipe') or 'job'}: " + " · ".join(parts)
    short = report.get("stopped_short") or []
    if short:
        what = "; ".join(
            f"{s['technique']} stopped at {s['reached']} of {s['asked']}"
            + (f", then brought to {s['now']} with no fine-tuning" if s["finished"] else "")
            for s in short
        )  # fmt: skip
        line += f" · NOT at target during training: {what}"
    return line


def _fmt_bytes(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.2f} MiB"


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Print the compression report of :func:`train` as two rich tables: per layer, then the totals."""
    console = console or Console()
    # At 80 columns: whole layer names (shortened from the left past NAME_WIDTH, never cut to "net.fe…"), sizes in
    # KiB, no borders between columns; the layer type (also in report.json and the W&B table) only when there is room.
    narrow = console.width < 100
    layers = Table(title=f"compression report: {report.get('recipe', '')} (sizes in KiB)", title_justify="left",
                   box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)  # fmt: skip
    names = [_shorten_left(row["name"], NAME_WIDTH) for row in report["layers"]]
    layers.add_column("layer", no_wrap=True, min_width=max(map(len, names), default=5))
    if not narrow:
        layers.add_column("type", no_wrap=True)
    for col in ("params", "nonzero", "sparsity", "bits", "fp32", "packed"):
        layers.add_column(col, justify="right", no_wrap=True)
    for name, row in zip(names, report["layers"], strict=True):
        cells = [name] + ([] if narrow else [row["type"]])
        cells += [f"{row['params']:,}", f"{row['nonzero']:,}", f"{row['sparsity']:.1%}", str(row["bits"]),
                  f"{row['bytes'] / 1024:,.1f}", f"{row['packed_bytes'] / 1024:,.1f}"]  # fmt: skip
        layers.add_row(*cells)
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
    console.print(headline(report), style="bold", soft_wrap=False)
