"""The one place that loads matplotlib for the package's PNG plots (sweep fronts, sensitivity scans)."""

from __future__ import annotations

from typing import Any


def pyplot(what: str) -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or a clear error naming ``what`` needed it."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"{what} needs matplotlib: `pip install 'lightning-compress[sweeps]'`.") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
