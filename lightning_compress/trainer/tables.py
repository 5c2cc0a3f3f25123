"""Tables for any Lightning logger: W&B renders them as tables, every other logger gets a CSV file.

Callbacks and apps log scalars through ``pl_module.log`` / ``logger.log_metrics``; a table has no such common API,
so it goes through :func:`log_table` alone, and no callback asks which logger it has.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger


def table_path(folder: str | os.PathLike, key: str) -> Path:
    """Where a non-W&B logger's table ``key`` is written: ``<folder>/tables/<key with / as __>.csv``."""
    return Path(folder) / "tables" / f"{key.replace('/', '__')}.csv"


def log_table(
    loggers: Iterable[Logger],
    key: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    fallback_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Log ``rows`` under ``key`` to every logger: a ``wandb.Table`` for W&B, a CSV file for the others (in the
    logger's ``log_dir``, else ``fallback_dir``). Call it on rank zero only. Returns the CSV files written."""
    written = []
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=list(columns), data=[list(r) for r in rows])
            continue
        folder = getattr(logger, "log_dir", None) or fallback_dir
        if folder is None:
            continue
        path = table_path(folder, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(rows)
        written.append(path)
    return written
