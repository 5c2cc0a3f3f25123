"""Tables for any Lightning logger, each through its own API, never dropped silently.

Callbacks and apps log scalars through ``pl_module.log`` / ``logger.log_metrics``; a table has no such common API,
so it goes through :func:`log_table` alone, and no callback asks which logger it has:

* ``WandbLogger``: a ``wandb.Table`` (rendered as a table in the run's page);
* ``MLFlowLogger``: a CSV artifact of the run, ``tables/<key>.csv`` (in the run, so the next run does not overwrite
  it);
* ``TensorBoardLogger``: a text entry (a Markdown table, shown under TEXT) and a CSV file in its ``log_dir``;
* ``CSVLogger`` and any other logger with a ``log_dir``: a CSV file there, ``tables/<key with / as __>.csv``;
* a logger with neither: a CSV file in the fallback folder (the Trainer's ``default_root_dir``), with one warning
  naming the logger and the file.

Lightning's ``DummyLogger`` (``fast_dev_run`` suppresses logging) gets nothing, as every other metric.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities import rank_zero_warn


def table_path(folder: str | os.PathLike, key: str) -> Path:
    """Where a table ``key`` is written as a CSV file in ``folder``: ``<folder>/tables/<key with / as __>.csv``."""
    return Path(folder) / "tables" / f"{key.replace('/', '__')}.csv"


def table_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The table as CSV text (a header, then one line per row)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return out.getvalue()


def table_markdown(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The table as Markdown (TensorBoard renders a text entry as Markdown)."""
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def _write_csv(folder: str | os.PathLike, key: str, text: str) -> Path:
    path = table_path(folder, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def log_table(
    loggers: Iterable[Logger],
    key: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    fallback_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Log ``rows`` under ``key`` to every logger through its own API (see the module's docstring). Call it on rank
    zero only. Returns the CSV files written.

    Raises:
        ValueError: A logger that stores no table, with no ``fallback_dir`` to write it to (named).
    """
    written = []
    text = table_csv(columns, rows)
    for logger in loggers:
        if isinstance(logger, DummyLogger):
            continue
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=list(columns), data=[list(r) for r in rows])
            continue
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_text(logger.run_id, text, f"tables/{key}.csv")
            continue
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, table_markdown(columns, rows))
        folder = getattr(logger, "log_dir", None)
        if folder is None:
            if fallback_dir is None:
                raise ValueError(
                    f"{type(logger).__name__} stores no table and has no log_dir, and no folder was given to write "
                    f"the table {key!r} to: pass fallback_dir (the Trainer's default_root_dir)."
                )
            folder = fallback_dir
            rank_zero_warn(
                f"{type(logger).__name__} has no table API and no log_dir: the table {key!r} is written to "
                f"{table_path(folder, key)} instead."
            )
        written.append(_write_csv(folder, key, text))
    return written
