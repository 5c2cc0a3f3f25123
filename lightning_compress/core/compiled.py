"""Models behind ``torch.compile``: every export, report and verb takes a compiled model as the model it wraps.

``torch.compile(model)`` returns an ``OptimizedModule`` that wraps the module (its ``_orig_mod``); a LightningModule
fitted that way is unwrapped by Lightning, which then replaces its ``forward`` and ``*_step`` methods by compiled ones
(``lightning.pytorch.utilities.compile.from_compiled``). Tracing either for an export (``torch.export``) fails on the
compiled frames, and module surgery must reach the module itself. :func:`uncompiled` gives the plain module for the
duration of a block — the compiled methods are put back afterwards, so training goes on compiled.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

from torch import nn

#: The methods Lightning's ``from_compiled`` replaces by compiled ones (its ``_compiler_ctx`` keeps the originals).
COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")

F = TypeVar("F", bound=Callable[..., Any])


def unwrap_compiled(model: Any) -> Any:
    """The module an ``OptimizedModule`` (``torch.compile``'s result) wraps, through any number of wrappings; anything
    else as it is."""
    while isinstance(model, nn.Module) and type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        model = model._orig_mod
    return model


@contextmanager
def uncompiled(model: Any) -> Iterator[Any]:
    """Within the block, the plain module behind ``model``: an ``OptimizedModule``'s ``_orig_mod``, with the original
    methods of a LightningModule that Lightning compiled (``forward`` and the steps; the compiled ones are put back
    when the block ends). Anything else is given as it is."""
    model = unwrap_compiled(model)
    ctx = getattr(model, "_compiler_ctx", None)
    if not isinstance(ctx, dict) or "original_forward" not in ctx:
        yield model
        return
    compiled = {name: model.__dict__[name] for name in COMPILED_METHODS if name in model.__dict__}
    for name in compiled:
        setattr(model, name, ctx[f"original_{name}"])
    try:
        yield model
    finally:
        for name, method in compiled.items():
            setattr(model, name, method)


def accepts_compiled(*names: str) -> Callable[[F], F]:
    """Decorate a function whose arguments ``names`` (default: ``"model"``) are models, so that a compiled model is
    taken as the plain module it wraps (:func:`uncompiled`) for the duration of the call."""
    wanted = names or ("model",)

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            with ExitStack() as stack:
                for name in wanted:
                    if name in bound.arguments:
                        bound.arguments[name] = stack.enter_context(uncompiled(bound.arguments[name]))
                return fn(*bound.args, **bound.kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
