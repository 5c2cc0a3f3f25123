"""Argument checks and the sets of choices: one helper for every number, one ``str`` Enum for every choice.

Every public constructor of the package checks its arguments here, so that a wrong value fails at once with the
same kind of message everywhere: the argument's name, what was expected, what was given.

Points of training (``start_epoch``, ``end_epoch``, ...) are either epochs (a number, fractions allowed) or a share
of the Trainer's whole run, written as a percentage string such as ``"66.7%"``: a recipe written that way follows the
length of whichever Trainer it is used in. :func:`parse_epoch` reads both; :func:`resolve_epoch` turns a share into
epochs once the length of training is known.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from typing import Any, TypeVar

E = TypeVar("E", bound=Enum)


class Choice(str, Enum):
    """A set of string choices; members compare equal to their strings (``Schedule.CUBIC == "cubic"``)."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(str(m.value) for m in cls)


class Schedule(Choice):
    """How the pruning target moves from the initial to the final sparsity."""

    CUBIC = "cubic"
    LINEAR = "linear"


class Scope(Choice):
    """Where weights compete: across all selected layers, or inside each layer."""

    GLOBAL = "global"
    LAYER = "layer"


class Criterion(Choice):
    """What decides which weights are pruned."""

    MAGNITUDE = "magnitude"
    RANDOM = "random"
    THRESHOLD = "threshold"
    TAYLOR = "taylor"
    MOVEMENT = "movement"


class Observer(Choice):
    """How a quantizer's range is found: observed min/max, or learned step sizes (LSQ)."""

    MINMAX = "minmax"
    LSQ = "lsq"


def check_choice(name: str, value: Any, choices: type[E]) -> E:
    """The member of ``choices`` that ``value`` names, or a clear error naming the argument and the choices.

    Example:
        >>> check_choice("schedule", "linear", Schedule)
        <Schedule.LINEAR: 'linear'>
    """
    try:
        return choices(value)
    except ValueError:
        allowed = tuple(str(m.value) for m in choices)
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.") from None


def is_number(value: Any) -> bool:
    """A real int or float (``bool`` is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a string where a number belongs, ...). Both a ``TypeError`` and a
    ``ValueError``, so that code catching either for bad arguments catches it."""


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    finite: bool = True,
    optional: bool = False,
    what: str | None = None,
) -> Any:
    """``value`` if it is a number (an integer with ``integer=True``) within the bounds; otherwise an error naming
    the argument, what was expected and the value: :class:`ArgumentTypeError` for a value that is no number at all
    (``bool`` included), ``ValueError`` for one out of range (NaN included). ``None`` passes when ``optional``.

    Args:
        name: The argument's name, as the user wrote it.
        low, high: Bounds (``None``: unbounded); closed unless ``low_open`` / ``high_open``.
        integer: Require an ``int``.
        finite: Refuse infinities (NaN is always refused).
        optional: Let ``None`` through.
        what: Wording of the expectation, when the generated one would not read well.

    Example:
        >>> check_number("alpha", 0.5, 0, 1)
        0.5
        >>> check_number("alpha", 1.5, 0, 1)
        Traceback (most recent call last):
        ...
        ValueError: `alpha` must be in [0, 1], got 1.5.
        >>> check_number("temperature", "4", 0, low_open=True)
        Traceback (most recent call last):
        ...
        lightning_compress.core.checks.ArgumentTypeError: `temperature` must be a finite number > 0, got '4'.
    """
    if value is None and optional:
        return None
    kind = "an integer" if integer else ("a finite number" if finite else "a number")
    interval = None
    if low is not None and high is not None:
        interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        full = f"{'an integer' if integer else 'a number'} {interval}"
    elif low is not None:
        full = f"{kind} {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        full = f"{kind} {'<' if high_open else '<='} {high:g}"
    else:
        full = kind
    if optional:
        full += " or None"
    if not (isinstance(value, int) and not isinstance(value, bool) if integer else is_number(value)):
        raise ArgumentTypeError(f"`{name}` must be {what or full}, got {value!r}.")
    number = float(value)
    ok = not math.isnan(number) and (not finite or math.isfinite(number))
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        expected = what or (interval if interval is not None and not integer and not optional else full)
        raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
    return value


def check_flag(name: str, value: Any) -> bool:
    """A real ``bool`` (``"no"`` or ``1`` are refused: a string is always truthy)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"`{name}` must be True or False, got {value!r}.")
    return value


_SHARE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")


def parse_epoch(name: str, value: Any, optional: bool = False) -> float | str | None:
    """A point of training: epochs (a number >= 0, fractions allowed) or a share of the run (``"25%"``, 0–100 %).

    Returns the number of epochs as a float, or the share normalised to ``"<percent>%"``.

    Example:
        >>> parse_epoch("end_epoch", 20)
        20.0
        >>> parse_epoch("end_epoch", "66.7 %")
        '66.7%'
    """
    if value is None and optional:
        return None
    if isinstance(value, str):
        match = _SHARE.match(value)
        if match and float(match.group(1)) <= 100:
            return f"{float(match.group(1)):g}%" if float(match.group(1)).is_integer() else f"{match.group(1)}%"
    elif is_number(value) and not math.isnan(value) and math.isfinite(value) and value >= 0:
        return float(value)
    none = " or None" if optional else ""
    raise ValueError(
        f"`{name}` must be a number of epochs >= 0 (fractions allowed) or a share of training such as '50%'{none}, "
        f"got {value!r}."
    )


def epoch_share(value: float | str) -> float | None:
    """The share of training (0–1) a parsed point names, or ``None`` for a point given in epochs."""
    return float(value[:-1]) / 100 if isinstance(value, str) else None


def resolve_epoch(value: float | str, total_epochs: float) -> float:
    """Epochs of a parsed point, given the length of the whole run in epochs.

    Example:
        >>> resolve_epoch("50%", 30)
        15.0
        >>> resolve_epoch(4.0, 30)
        4.0
    """
    share = epoch_share(value)
    return float(value) if share is None else share * total_epochs


def show_epoch(value: float | str | None) -> str:
    """A parsed point of training as the user wrote it (``5``, ``2.5``, ``'50%'``)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def comparable(a: float | str | None, b: float | str | None) -> tuple[float, float] | None:
    """Two parsed points as numbers of one unit (epochs, or shares of training), or ``None`` when either is missing
    or they are in different units (those are compared once the length of training is known).

    Example:
        >>> comparable("25%", "50%"), comparable(3.0, "50%")
        ((0.25, 0.5), None)
    """
    if a is None or b is None or isinstance(a, str) != isinstance(b, str):
        return None
    key_a, key_b = epoch_share(a), epoch_share(b)
    return (float(a), float(b)) if key_a is None or key_b is None else (key_a, key_b)


def same_kind_order(first: tuple[str, float | str | None], second: tuple[str, float | str | None]) -> None:
    """Refuse ``first`` after ``second`` when both are given in the same unit (epochs, or shares of training).
    Points in different units are compared once the length of training is known."""
    (name_a, a), (name_b, b) = first, second
    keys = comparable(a, b)
    if keys is not None and keys[0] > keys[1]:
        raise ValueError(f"`{name_a}` ({show_epoch(a)}) must not be after `{name_b}` ({show_epoch(b)}).")
