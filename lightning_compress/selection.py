"""Which modules a compression technique acts on: one mechanism shared by every callback.

Names are those of ``model.named_modules()``; ``include`` and ``exclude`` are regular expressions
searched (``re.search``) in them. A pattern in ``include`` that matches nothing is an error, never a
silent no-op: a typo would otherwise leave a layer uncompressed without anyone noticing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

#: Module types whose ``weight`` the techniques compress by default.
COMPRESSIBLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
)


def _as_patterns(name: str, value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    patterns = [value] if isinstance(value, str) else list(value)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"`{name}` must hold regular-expression strings, got {pattern!r}.")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"`{name}` pattern {pattern!r} is not a valid regular expression: {err}.") from err
    return patterns


def _candidates(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return shown + more


def select_modules(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: tuple[type[nn.Module], ...] = COMPRESSIBLE_TYPES,
) -> list[tuple[str, nn.Module]]:
    """Return ``(name, module)`` for every module of ``types`` selected by ``include`` / ``exclude``.

    Args:
        model: The model to search (a LightningModule or any ``nn.Module``).
        include: Regular expression(s); when given, a module is kept only if one of them is found in its
            name. Every pattern must match at least one module of ``types``.
        exclude: Regular expression(s); a module whose name one of them is found in is dropped.
        types: The module classes that can be selected.

    Raises:
        ValueError: An ``include`` pattern matches no module of ``types`` (the message lists candidates),
            or nothing is left to select.

    Example:
        >>> from torch import Tensor, nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [name for name, _ in select_modules(net, exclude=r"^2$")]
        ['0']
    """
    include_patterns = _as_patterns("include", include)
    exclude_patterns = _as_patterns("exclude", exclude)
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, types) and name]
    names = [name for name, _ in candidates]
    type_names = "/".join(t.__name__ for t in types)
    for pattern in include_patterns:
        if not any(re.search(pattern, name) for name in names):
            raise ValueError(
                f"`include` pattern {pattern!r} matches no {type_names} module. "
                f"Candidates: {_candidates(names) or 'none'}."
            )
    selected = [
        (name, m)
        for name, m in candidates
        if (not include_patterns or any(re.search(p, name) for p in include_patterns))
        and not any(re.search(p, name) for p in exclude_patterns)
    ]
    if not selected:
        raise ValueError(
            f"No {type_names} module is left to compress in {type(model).__name__} "
            f"(include={include_patterns or None}, exclude={exclude_patterns or None}). "
            f"Candidates: {_candidates(names) or 'none'}."
        )
    return selected


def weights_of(selected: Sequence[tuple[str, nn.Module]]) -> dict[str, Tensor]:
    """Name → ``weight`` parameter of the selected modules (the tensors a technique rewrites in place)."""
    out: dict[str, Tensor] = {}
    for name, module in selected:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            raise ValueError(f"module {name!r} ({type(module).__name__}) has no weight tensor to compress.")
        out[name] = weight
    return out


def match_overrides(name: str, overrides: dict[str, float] | None) -> float | None:
    """The override value for ``name``: the first pattern of ``overrides`` found in it, else ``None``."""
    for pattern, value in (overrides or {}).items():
        if re.search(pattern, name):
            return value
    return None


def check_overrides_match(names: Sequence[str], overrides: Mapping[str, object] | None, argument: str) -> None:
    """Raise if a pattern of a per-layer override dict matches none of the selected ``names``."""
    for pattern in _as_patterns(argument, list((overrides or {}).keys())):
        if not any(re.search(pattern, name) for name in names):
            raise ValueError(
                f"`{argument}` pattern {pattern!r} matches no selected layer. "
                f"Selected layers: {_candidates(list(names))}."
            )
