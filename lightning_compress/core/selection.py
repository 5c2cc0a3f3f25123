"""Which modules a compression technique acts on: one mechanism shared by every callback.

Names are those of ``model.named_modules()``; ``include`` and ``exclude`` are regular expressions
searched (``re.search``) in them. A pattern in ``include`` that matches nothing is an error, never a
silent no-op: a typo would otherwise leave a layer uncompressed without anyone noticing.

Patterns that mean the same on any model (for recipes that travel between models) start with ``@``:

* ``@first`` / ``@last`` — the first / last Conv or Linear layer among the candidates, in the order the model
  registers its modules (for ``nn.Sequential`` and most models, the order of the forward pass);
* ``@Conv2d``, ``@Linear``, ... — every candidate of that module class (by class name, subclasses included).

They are accepted wherever a layer pattern is: ``include``, ``exclude``, ``layer_sparsity``, ``layer_bits``.

Embeddings (``nn.Embedding``) are never selected by default — they are lookup tables, often half of a language
model's weights, and compressing them costs more accuracy per byte than the layers around them — but a pattern of
``include`` that names one selects it: ``include=["@Linear", "@Embedding"]`` (or the embedding's name). Unstructured
pruning, quantization (int8 rows, weight only) and clustering compress them; a technique that cannot (N:M and channel
pruning, low rank) refuses them, saying why (:data:`EMBEDDINGS_REFUSED`).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lightning_compress.core.checks import ArgumentTypeError
from lightning_compress.core.layout import LAYER_TYPES, TRANSPOSED, linear_like, own_class, weight_layout

#: Module types whose ``weight`` the techniques compress by default — and, with ``nn.Linear``, every Linear-like
#: module (:func:`~lightning_compress.core.layout.linear_like`, e.g. Hugging Face's ``Conv1D``).
COMPRESSIBLE_TYPES: tuple[type[nn.Module], ...] = LAYER_TYPES


SELECTORS = ("@first", "@last")

#: Lookup tables: selected only when a pattern of ``include`` names them (see the module's docstring).
EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding,)

#: Module types that hold weights no technique compresses yet, and why. A model that has them gets a message at setup
#: naming each such layer (never a silent dense layer).
NOT_COMPRESSED: dict[type[nn.Module], str] = {
    nn.MultiheadAttention: "its in_proj weights (and, for quantization, out_proj) are used by the attention kernel "
    "directly, not through a Linear forward",
    nn.ConvTranspose1d: "transposed convolutions are not supported yet",
    nn.ConvTranspose2d: "transposed convolutions are not supported yet",
    nn.ConvTranspose3d: "transposed convolutions are not supported yet",
    nn.RNNBase: "recurrent weights (LSTM, GRU, RNN) are not supported yet",
    nn.EmbeddingBag: "embedding bags are read by the embedding_bag kernel (an nn.Embedding is compressed when "
    "`include` names it)",
}


def _check_pattern(name: str, pattern: Any) -> str:
    if not isinstance(pattern, str):
        raise ArgumentTypeError(f"`{name}` must hold regular-expression strings or @selectors, got {pattern!r}.")
    if pattern.startswith("@"):
        if pattern not in SELECTORS and not pattern[1:].isidentifier():
            raise ValueError(
                f"`{name}` selector {pattern!r} is not one of {SELECTORS} or @<module class name> (e.g. '@Linear')."
            )
        return pattern
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"`{name}` pattern {pattern!r} is not a valid regular expression: {err}.") from err
    return pattern


def as_patterns(name: str, value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, str) and not isinstance(value, Sequence):
        raise ArgumentTypeError(
            f"`{name}` must be a regular expression, an @selector or a list of them, got {type(value).__name__} "
            f"{value!r}."
        )
    patterns = [value] if isinstance(value, str) else list(value)
    if not patterns and name == "include":
        raise ValueError(
            "`include` is an empty list, which would select nothing; pass None to select every Conv/Linear layer."
        )
    return [_check_pattern(name, p) for p in patterns]


def _types_named(module: nn.Module) -> set[str]:
    names = {cls.__name__ for cls in type(module).__mro__}
    return names | {"Linear"} if linear_like(module) else names


def matches(pattern: str, name: str, candidates: Sequence[tuple[str, nn.Module]]) -> bool:
    """Whether ``pattern`` (a regular expression or an ``@`` selector) selects the module ``name`` among
    ``candidates`` (``(name, module)`` in the model's order).

    Example:
        >>> net = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
        >>> cands = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv1d, nn.Linear))]
        >>> [matches(p, "3", cands) for p in ("@first", "@last", "@Linear", "^3$", "@Conv1d")]
        [False, True, True, True, False]
    """
    if pattern in SELECTORS:  # the first / last Conv or Linear: an embedding is never one
        layers = [n for n, m in candidates if not isinstance(m, EMBEDDING_TYPES)]
        return bool(layers) and layers[0 if pattern == "@first" else -1] == name
    if pattern.startswith("@"):
        module = dict(candidates).get(name)
        return module is not None and pattern[1:] in _types_named(module)
    return re.search(pattern, name) is not None


def _candidates(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return shown + more


def select_modules(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: tuple[type[nn.Module], ...] = COMPRESSIBLE_TYPES,
    refuse_embeddings: str | None = None,
) -> list[tuple[str, nn.Module]]:
    """Return ``(name, module)`` for every module of ``types`` selected by ``include`` / ``exclude`` — and every
    embedding that a pattern of ``include`` names (never one by default).

    Args:
        model: The model to search (a LightningModule or any ``nn.Module``).
        include: Regular expression(s); when given, a module is kept only if one of them is found in its
            name. Every pattern must match at least one module of ``types`` (or an embedding).
        exclude: Regular expression(s); a module whose name one of them is found in is dropped.
        types: The module classes that can be selected; with ``nn.Linear`` among them, Linear-like modules too
            (:func:`~lightning_compress.core.layout.linear_like`: Hugging Face's ``Conv1D``).
        refuse_embeddings: Why the technique cannot compress an embedding (:data:`EMBEDDINGS_REFUSED`), if it cannot:
            an embedding that ``include`` names is then refused with this reason.

    Raises:
        ValueError: An ``include`` pattern matches no module of ``types`` (the message lists candidates),
            nothing is left to select, or an embedding is selected for a technique that ``refuse_embeddings``.

    Example:
        >>> from torch import Tensor, nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [name for name, _ in select_modules(net, exclude=r"^2$")] == ["0"]
        True
        >>> lm = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
        >>> [n for n, _ in select_modules(lm)], [n for n, _ in select_modules(lm, include=["@Linear", "@Embedding"])]
        (['1'], ['0', '1'])
    """
    include_patterns = as_patterns("include", include)
    exclude_patterns = as_patterns("exclude", exclude)
    linear = nn.Linear in types
    lookups = bool(include_patterns)  # an embedding is a candidate only where `include` can name it
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if name
        and (isinstance(m, types) or (linear and linear_like(m)) or (lookups and isinstance(m, EMBEDDING_TYPES)))
    ]
    names = [name for name, _ in candidates]
    type_names = "/".join(t.__name__ for t in (*types, *(EMBEDDING_TYPES if lookups else ())))
    for pattern in include_patterns:
        if not any(matches(pattern, name, candidates) for name in names):
            raise ValueError(
                f"`include` pattern {pattern!r} matches no {type_names} module. "
                f"Candidates: {_candidates(names) or 'none'}."
            )
    selected = [
        (name, m)
        for name, m in candidates
        if (not include_patterns or any(matches(p, name, candidates) for p in include_patterns))
        and not any(matches(p, name, candidates) for p in exclude_patterns)
    ]
    if not selected:
        raise ValueError(
            f"No {type_names} module is left to compress in {type(model).__name__} "
            f"(include={include_patterns or None}, exclude={exclude_patterns or None}). "
            f"Candidates: {_candidates(names) or 'none'}."
        )
    tables = [name for name, m in selected if isinstance(m, EMBEDDING_TYPES)]
    if tables and refuse_embeddings is not None:
        raise ValueError(
            f"`include` selects the embedding{'s' if len(tables) > 1 else ''} {_candidates(tables)}, which "
            f"{refuse_embeddings}. Leave {'them' if len(tables) > 1 else 'it'} out: "
            f"exclude={[*exclude_patterns, *(f'^{re.escape(n)}$' for n in tables)]!r}."
        )
    return selected


#: Why a technique cannot compress an embedding (the refusal's words; see :func:`select_modules`).
EMBEDDINGS_REFUSED = {
    "nm": "N:M sparsity cannot speed up: its kernels multiply matrices, and an embedding's rows are looked up, not "
    "multiplied (prune an embedding with granularity='unstructured')",
    "channel": "channel pruning cannot cut: an embedding's columns are the width of every layer after it, and its "
    "rows are the vocabulary (prune an embedding with granularity='unstructured')",
    "low_rank": "low-rank factorization does not factorize: a lookup reads one row per token whatever the table's "
    "rank (prune, quantize or cluster an embedding instead)",
}


def embedding_advice(model: nn.Module) -> str:
    """The ``include`` that selects ``model``'s default layers and its embeddings, for messages."""
    layers = [m for n, m in model.named_modules() if n and (isinstance(m, LAYER_TYPES) or linear_like(m))]
    kinds = sorted({"@Linear" if linear_like(m) else f"@{own_class(m).__name__}" for m in layers})
    return f"include={[*kinds, '@Embedding']!r}"


class LayerWeights(Mapping[str, Tensor]):
    """Name → weight of the selected layers, output channels first (the tensors a technique rewrites in place): the
    ``weight`` parameter itself, or for a layer that stores it transposed (Hugging Face's ``Conv1D``) its transposed
    view. Read on every access, so it follows the parameter across device moves and checkpoint loads."""

    def __init__(self, selected: Sequence[tuple[str, nn.Module]]) -> None:
        self._modules: dict[str, nn.Module] = {}
        self._transposed: set[str] = set()
        for name, module in selected:
            if not isinstance(getattr(module, "weight", None), Tensor):
                raise ValueError(f"module {name!r} ({type(module).__name__}) has no weight tensor to compress.")
            self._modules[name] = module
            if weight_layout(module) == TRANSPOSED:
                self._transposed.add(name)

    def __getitem__(self, name: str) -> Tensor:
        weight: Tensor = self._modules[name].weight  # type: ignore[assignment]
        return weight.t() if name in self._transposed else weight

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def grad(self, name: str) -> Tensor | None:
        """The gradient of the layer's weight, in the same layout as ``self[name]`` (``None`` before a backward)."""
        grad: Tensor | None = self._modules[name].weight.grad  # type: ignore[union-attr,operator,assignment]
        return None if grad is None else (grad.t() if name in self._transposed else grad)


def weights_of(selected: Sequence[tuple[str, nn.Module]]) -> LayerWeights:
    """Name → weight of the selected modules, output channels first (:class:`LayerWeights`)."""
    return LayerWeights(selected)


def distinct_weights(
    selected: Sequence[tuple[str, nn.Module]], overrides: Mapping[str, Any] | None = None, argument: str = "overrides"
) -> list[tuple[str, nn.Module]]:
    """The selected layers with a weight shared by several of them (tied weights) kept once, under its first name: one
    parameter is ranked, counted and compressed once.

    Raises:
        ValueError: The per-layer ``overrides`` (``argument``, e.g. ``layer_sparsity``) give two layers that share a
            weight different values (both named): one weight cannot be compressed two ways.
    """
    unique: dict[int, tuple[str, nn.Module]] = {}
    for name, module in selected:
        key = id(getattr(module, "weight", module))
        if key in unique and overrides:
            first = unique[key][0]
            mine, theirs = match_overrides(name, overrides, selected), match_overrides(first, overrides, selected)
            if mine != theirs:
                raise ValueError(
                    f"{first!r} and {name!r} share one weight (tied), but `{argument}` gives them {theirs!r} and "
                    f"{mine!r}: one weight is compressed once. Give both the same value (or leave one out of the "
                    "pattern that sets it)."
                )
        unique.setdefault(key, (name, module))
    return list(unique.values())


def match_overrides(
    name: str, overrides: Mapping[str, Any] | None, selected: Sequence[tuple[str, nn.Module]] = ()
) -> Any | None:
    """The override value for ``name``: that of the first pattern of ``overrides`` that selects it (among the
    ``selected`` layers, for ``@`` selectors), else ``None``."""
    for pattern, value in (overrides or {}).items():
        if matches(pattern, name, selected):
            return value
    return None


def check_overrides_match(
    selected: Sequence[tuple[str, nn.Module]], overrides: Mapping[str, object] | None, argument: str
) -> None:
    """Raise if a pattern of a per-layer override dict selects none of the ``selected`` layers."""
    names = [n for n, _ in selected]
    for pattern in as_patterns(argument, list((overrides or {}).keys())):
        if not any(matches(pattern, name, selected) for name in names):
            raise ValueError(
                f"`{argument}` pattern {pattern!r} matches no selected layer. "
                f"Selected layers: {_candidates(list(names))}."
            )


def load_layer_values(path: str | os.PathLike, argument: str) -> dict[str, Any]:
    """Read a per-layer file (``{layer pattern: value}`` YAML, e.g. the ``layer_sparsity.yaml`` of a sensitivity
    scan) for the argument ``argument``.

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file does not hold a mapping of pattern strings.
    """
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"`{argument}` file {str(file)!r} does not exist.")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"`{argument}` file {str(file)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"`{argument}` file {str(file)!r} must hold a mapping {{layer pattern: value}}.")
    return data


#: Why a module of a type the techniques do not know keeps its weight (it is named, never counted).
UNKNOWN_LAYER = (
    "a layer type the techniques do not know (neither a Conv/Linear nor a module computing x·W + b); its weight is not "
    "compressed"
)


def _unknown_layer(module: nn.Module) -> bool:
    """A module with a weight matrix (≥ 2-D) of its own that is not of a type the techniques compress."""
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() >= 2 and weight_layout(module) is None


def not_compressed(
    model: nn.Module,
    technique: str,
    selected: Sequence[tuple[str, nn.Module]] = (),
    writes: bool = True,
    embeddings: str | None = None,
) -> str | None:
    """A message naming every layer of ``model`` whose weights ``technique`` leaves as they are (types in
    :data:`NOT_COMPRESSED`, and any other module with a weight matrix of its own that is neither a Conv/Linear nor
    Linear-like), or ``None`` when there is none.

    An embedding that is not selected is named with the ``include`` that selects it — or, for a technique that
    cannot compress embeddings, with the reason ``embeddings`` (:data:`EMBEDDINGS_REFUSED`). Such a layer whose
    weight is tied to one of the ``selected`` layers (GPT-2's token embedding and its ``lm_head``)
    is named apart: a technique that ``writes`` the weights (pruning, clustering, low rank) compresses it with that
    layer; quantization does not (the embedding reads the float weight).

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
        >>> print(not_compressed(net, "MagnitudePruning"))  # doctest: +ELLIPSIS
        MagnitudePruning does not compress 1 layer, which keeps its weights as they are: '0' (Embedding: ... \
include=['@Linear', '@Embedding']). ...
    """
    owners = {id(w): n for n, m in selected if isinstance(w := getattr(m, "weight", None), Tensor)}
    chosen = {id(m) for _, m in selected}
    alike: dict[tuple[str, str], list[str]] = {}  # layers of one type left out for one reason, named together
    tied = []
    for name, module in model.named_modules():
        if id(module) in chosen:
            continue
        reason = next((why for cls, why in NOT_COMPRESSED.items() if isinstance(module, cls)), None)
        if reason is None and isinstance(module, EMBEDDING_TYPES):
            reason = embeddings or (
                f"embeddings are compressed only when `include` names them: {embedding_advice(model)}"
            )
        if reason is None and _unknown_layer(module):
            reason = UNKNOWN_LAYER
        if reason is None or not name:
            continue
        owner = owners.get(id(module._parameters.get("weight")))
        if owner is not None:
            tied.append(f"{name!r} ({type(module).__name__}) with {owner!r}")
        else:
            alike.setdefault((type(module).__name__, reason), []).append(repr(name))
    found = [f"{', '.join(names)} ({kind}: {reason})" for (kind, reason), names in alike.items()]
    count = sum(len(names) for names in alike.values())
    parts = []
    if found:
        many = count > 1
        parts.append(
            f"{technique} does not compress {count} layer{'s' if many else ''}, which keep{'' if many else 's'} "
            f"{'their' if many else 'its'} weights as they are: {', '.join(found)}. The Conv/Linear "
            f"layers around {'them' if many else 'it'} are compressed as usual; nothing to do unless "
            f"{'they hold' if many else 'it holds'} most of the weights."
        )
    if tied:
        parts.append(
            f"Tied weights: {', '.join(tied)} share one weight, "
            + (
                f"which {technique} compresses once, through the selected layer: both use the compressed weight."
                if writes
                else f"which {technique} quantizes for the selected layer only: the other reads it in float (the "
                "int8 export keeps a float copy of it for that layer). Name the other in `include` to quantize it "
                f"too ({embedding_advice(model)})."
            )
        )
    return " ".join(parts) or None


def settled(
    model: nn.Module, layers: Sequence[tuple[str, nn.Module]], config: Any, technique: str
) -> tuple[list[tuple[str, nn.Module]], str | None]:
    """The ``layers`` selected for ``config`` (a technique config) with a weight tied to several of them kept once
    (per-layer overrides giving it two values refused), and the message naming what ``technique`` leaves out
    (:func:`not_compressed`), or ``None`` — what the verbs and the callbacks both say, each in its own way."""
    selected = distinct_weights(layers, config.per_layer, config.per_layer_field or "")
    return selected, not_compressed(model, technique, selected, embeddings=config.embeddings_refused)


def select_for(model: nn.Module, config: Any) -> list[tuple[str, nn.Module]]:
    """The layers a verb compresses as ``config`` (a technique config) asks, in the callbacks' words: selected
    (embeddings only when ``include`` names them, and only for a technique that can compress them), a weight tied to
    several layers kept once, and what is left out said in one warning (:func:`settled`)."""
    layers = select_modules(model, config.include, config.exclude, refuse_embeddings=config.embeddings_refused)
    selected, message = settled(model, layers, config, config.technique)
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=3)
    return selected


def inside(model: nn.Module, hosts: tuple[type[nn.Module], ...] | Callable[[nn.Module], bool]) -> set[str]:
    """Names of the modules that are descendants of a module of the types ``hosts`` (or for which the predicate
    ``hosts`` holds): e.g. a MultiheadAttention's out_proj."""
    is_host = (lambda module: isinstance(module, hosts)) if isinstance(hosts, tuple) else hosts
    names: set[str] = set()
    for name, module in model.named_modules():
        if is_host(module) and name:
            names.update(f"{name}.{child}" for child, _ in module.named_modules() if child)
    return names
