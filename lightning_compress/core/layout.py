"""Which modules are weight layers, and how their weight is laid out: the matrix view every technique works on.

A Conv or Linear stores its weight ``(out, in, …)``. Some libraries write their own Linear — Hugging Face's
``Conv1D`` (GPT-2 and its relatives) computes ``x @ W + b`` with ``W`` stored ``(in, out)``, the transpose of
``nn.Linear``'s. Such a module is a Linear all the same: the techniques prune, quantize, cluster and factorize it
through :func:`matrix_weight`, its weight in Linear layout (a transposed view, written through in place), and the
exports write it as a Linear.

A module is recognised as Linear-like by what it computes, not by its name: a module with a 2-D ``weight``, an
optional 1-D ``bias`` and no submodules, whose forward on a probe batch gives ``x @ W + b`` (:data:`TRANSPOSED`) or
``x @ Wᵀ + b`` (:data:`LINEAR`), checked once per class on a copy of the first instance met (the probe never runs
the user's module itself, so observers, hooks and statistics are untouched).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

#: The weight is ``(out, in, …)``: nn.Linear, the convolutions, and Linear-like modules that store it that way.
LINEAR = "linear"
#: The weight is ``(in, out)``: the module computes ``x @ W + b`` (Hugging Face's ``Conv1D``).
TRANSPOSED = "transposed"

#: The layer types every technique knows by their class.
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

_PROBED: dict[type, str | None] = {}


def own_class(module: nn.Module) -> type:
    """The module's class before a technique swapped it (quantization-aware training subclasses a layer's class)."""
    return getattr(module, "_original_class", type(module))


@torch.no_grad()
def _probe(module: nn.Module) -> str | None:
    weight = module._parameters.get("weight")
    bias = module._parameters.get("bias")
    if weight is None or weight.dim() != 2 or weight.is_meta or next(module.children(), None) is not None:
        return None
    if bias is not None and bias.dim() != 1:
        return None
    trial = copy.deepcopy(module).float().cpu().eval()
    w: Tensor = trial._parameters["weight"].detach()  # type: ignore[union-attr]
    bias_param = trial._parameters.get("bias")
    b = None if bias_param is None else bias_param.detach()
    generator = torch.Generator().manual_seed(0)
    for layout, x_size, expected in (
        (TRANSPOSED, w.shape[0], lambda x: x @ w),
        (LINEAR, w.shape[1], lambda x: x @ w.T),
    ):
        x = torch.randn(3, int(x_size), generator=generator)
        want = expected(x) + (b if b is not None else 0)
        try:
            got = trial(x)
        except Exception:  # noqa: BLE001 - a module that does not take a (batch, features) input is not Linear-like
            continue
        if isinstance(got, Tensor) and got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            return layout
    return None


def weight_layout(module: nn.Module) -> str | None:
    """:data:`LINEAR` for a Conv / Linear (or a Linear-like module storing ``(out, in)``), :data:`TRANSPOSED` for a
    Linear-like module storing ``(in, out)``, ``None`` for anything else.

    Example:
        >>> class Conv1D(nn.Module):  # Hugging Face's GPT-2 layer: y = x @ W + b, W stored (in, out)
        ...     def __init__(self, nf, nx):
        ...         super().__init__()
        ...         self.weight, self.bias = nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.zeros(nf))
        ...     def forward(self, x):
        ...         return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)
        >>> weight_layout(Conv1D(8, 4)), weight_layout(nn.Linear(4, 8)), weight_layout(nn.Embedding(4, 8))
        ('transposed', 'linear', None)
    """
    if isinstance(module, LAYER_TYPES):
        return LINEAR
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvTransposeNd)):
        return None
    cls = own_class(module)
    if cls not in _PROBED:
        layout = _probe(module)
        if layout is None and module._parameters.get("weight") is None:
            return None  # not cached: a parameterless instance says nothing about the class
        _PROBED[cls] = layout
    return _PROBED[cls]


def linear_like(module: nn.Module) -> bool:
    """A module that is not a Conv/Linear subclass but computes one (see :func:`weight_layout`)."""
    return not isinstance(module, LAYER_TYPES) and weight_layout(module) is not None


def matrix_weight(module: nn.Module) -> Tensor:
    """The module's weight with output channels first (``(out, in, …)``): the parameter itself, or for a
    :data:`TRANSPOSED` module its transposed view (in-place writes reach the parameter)."""
    weight: Any = module.weight
    return weight.t() if weight_layout(module) == TRANSPOSED else weight
