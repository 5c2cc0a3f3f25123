"""Read back what a W&B offline run logged, from its ``run-*.wandb`` file.

Offline runs write no ``wandb-summary.json`` and wandb 0.31 ships no Python reader, so the tests parse the
transaction log themselves: a 7-byte header (``:W&B``, magic 0xBEE1, version), then 32 KiB blocks of
records, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) whose payloads
join into ``wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_BLOCK = 32 * 1024
_HEADER = 7


def read_records(path: str | Path, timeout: float = 20.0) -> list[wandb_internal_pb2.Record]:
    """The run's records, once the run is complete: wandb's service may still be writing the file for a moment after
    ``wandb.finish()`` returns, so this waits (up to ``timeout`` seconds) for the run's closing ``exit`` record."""
    deadline = time.monotonic() + timeout
    while True:
        records = _parse(Path(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _parse(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    records, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # too little room left in the block: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        payload = data[pos + _HEADER : pos + _HEADER + length]
        if (length == 0 and kind == 0) or pos + _HEADER + length > len(data):
            break  # end of the log, or a record still being written
        # The checksum covers the type byte and the payload (LevelDB log format, crc32 not crc32c).
        if zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos += _HEADER + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def run_file(run_root: str | Path) -> Path:
    """The single ``run-*.wandb`` under ``run_root`` (a Hydra run directory or its ``wandb/``)."""
    files = sorted(Path(run_root).rglob("run-*.wandb"))
    if len(files) != 1:
        raise AssertionError(f"expected one W&B run under {run_root}, found {files}")
    return files[0]


def history(path: str | Path) -> list[dict[str, Any]]:
    """Every logged row (``wandb.log`` / ``logger.log_metrics``), keys to decoded JSON values."""
    rows = []
    for r in read_records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def _updates(path: str | Path, record_type: str) -> dict[str, Any]:
    """Key → value of every ``config`` or ``summary`` record, later updates overriding earlier ones."""
    out: dict[str, Any] = {}
    for r in read_records(path):
        if r.WhichOneof("record_type") == record_type:
            for item in getattr(r, record_type).update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def config(path: str | Path) -> dict[str, Any]:
    """The run config as logged."""
    return _updates(path, "config")


def summary(path: str | Path) -> dict[str, Any]:
    """The run summary as logged."""
    return _updates(path, "summary")


def run_group(path: str | Path) -> str:
    """The W&B group the run was logged under."""
    (record,) = [r for r in read_records(path) if r.WhichOneof("record_type") == "run"]
    return record.run.run_group


def table(path: str | Path, key: str) -> dict[str, Any]:
    """The last ``wandb.Table`` logged under ``key`` in the run of ``path`` (its JSON: ``columns``, ``data``).

    The history row for ``key`` names (as ``<key>/path``) the file that holds the table, under the run's ``files/``."""
    files = [r[f"{key}/path"] for r in history(path) if f"{key}/path" in r]
    if not files:
        raise AssertionError(f"no table logged under {key!r} in {path}")
    return json.loads((Path(path).parent / "files" / files[-1]).read_text())
