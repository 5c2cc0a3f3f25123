"""Stages computed once and reused: a directory of files named by a hash of what produced them.

A sweep's trials share expensive stages — a teacher, a dense baseline, a finished trial's report. Each is stored
under ``<root>/<stage>-<digest>.<suffix>``, where the digest is a SHA-256 of the stage's resolved settings (JSON,
keys sorted), so that two trials with the same settings find the same file and any change of a setting makes a new
one. A stored file that cannot be read is never used silently: :meth:`StageCache.load` warns, names the file and
the reason, deletes it and returns ``None`` so that the caller computes the stage again. Files are written to a
temporary name and renamed, so a reader never sees half a file.

Example:
    >>> import tempfile, json
    >>> cache = StageCache(tempfile.mkdtemp())
    >>> key = {"model": {"width": 64}, "epochs": 30}
    >>> cache.load("teacher", key, lambda p: json.loads(p.read_text())) is None
    True
    >>> path = cache.store("teacher", key, lambda p: p.write_text('{"accuracy": 0.98}'), suffix=".json")
    >>> cache.load("teacher", key, lambda p: json.loads(p.read_text()), suffix=".json")
    {'accuracy': 0.98}
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def digest(settings: Any, length: int = 16) -> str:
    """A stable hex digest of JSON-like ``settings`` (mappings with any key order give the same digest).

    Example:
        >>> digest({"a": 1, "b": [2, 3]}) == digest({"b": [2, 3], "a": 1})
        True
        >>> digest({"a": 1}) == digest({"a": 2})
        False
    """
    text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


class StageCache:
    """Files of computed stages under ``root``, one per stage name and settings digest.

    Args:
        root: The directory (created on the first store), e.g. ``<sweep dir>/stages``.

    Raises:
        ValueError: ``root`` exists and is not a directory, or cannot be created or written (named in the message).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"stage cache {str(self.root)!r} exists and is not a directory.")

    def path(self, stage: str, settings: Mapping[str, Any] | Any, suffix: str = "") -> Path:
        """Where ``stage`` computed with ``settings`` is stored."""
        return self.root / f"{stage}-{digest(settings)}{suffix}"

    def load(self, stage: str, settings: Any, reader: Callable[[Path], T], suffix: str = "") -> T | None:
        """``reader(file)`` of the stored stage, or ``None`` when it was not stored yet — or was stored but could not
        be read (then a warning names the file and the reason, and the file is removed so that it is recomputed)."""
        path = self.path(stage, settings, suffix)
        if not path.is_file():
            return None
        try:
            return reader(path)
        except Exception as err:  # noqa: BLE001 - whatever makes a stored file unreadable means: compute it again
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(
                f"The cached {stage} stage {str(path)!r} is corrupt ({reason}); computing it again.",
                RuntimeWarning,
                stacklevel=2,
            )
            path.unlink(missing_ok=True)
            return None

    def store(self, stage: str, settings: Any, writer: Callable[[Path], Any], suffix: str = "") -> Path:
        """Write the stage with ``writer(temporary file)`` and move it into place; returns its path."""
        path = self.path(stage, settings, suffix)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"cannot create the stage cache {str(self.root)!r}: {err.strerror or err}.") from None
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            writer(temporary)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path
