"""Sparsity schedules: the target sparsity at a point of training. Pure functions, no Lightning."""

from __future__ import annotations

import math

from lightning_compress.core.checks import Schedule, check_choice


def sparsity_at(progress: float, initial_sparsity: float, final_sparsity: float, schedule: str = "cubic") -> float:
    """Target sparsity at ``progress`` ∈ [0, 1] of the pruning ramp.

    ``cubic`` is the schedule of Zhu & Gupta (2017), "To prune, or not to prune":
    ``s_t = s_f + (s_i − s_f)(1 − t)³`` — it prunes fast while many redundant weights remain and slowly
    near the end. ``linear`` moves at a constant rate. Progress is clamped to [0, 1], so the final
    sparsity holds after the ramp.

    Example:
        >>> round(sparsity_at(0.5, 0.0, 0.8), 4)
        0.7
        >>> sparsity_at(0.5, 0.0, 0.8, "linear")
        0.4
    """
    kind = check_choice("schedule", schedule, Schedule)
    if math.isnan(progress):
        raise ValueError("`progress` is NaN.")
    t = min(max(progress, 0.0), 1.0)
    if kind is Schedule.CUBIC:
        return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - t) ** 3
    return initial_sparsity + (final_sparsity - initial_sparsity) * t
