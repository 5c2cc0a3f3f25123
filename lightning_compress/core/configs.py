"""One validated config per technique: *what* a technique does, checked once, here.

Each technique has three faces that share one of these configs, so that they refuse the same bad input with the same
message:

* the config itself — ``PruningConfig(final_sparsity=1.5)`` fails at once;
* the verb that applies it to any ``nn.Module`` (``prune_(model, config)``, ``low_rank_``, ``cluster_weights_``,
  ``prepare_qat``, ``quantize_``);
* the callback, which builds the same config from its arguments and adds only *when* (epochs, ramps, phases).

A config is a dataclass: ``to_dict()`` gives its fields as plain values (what a Hydra YAML under
``conf/compression/`` holds for them), ``from_dict()`` builds one back and refuses a key that is not a field, naming
the fields it has. Choices are typed as ``Literal`` (LightningCLI and type checkers list them), and checked here with
the allowed values in the message.

Example:
    >>> PruningConfig(final_sparsity=0.5, granularity="2:4").scope
    'layer'
    >>> PruningConfig.from_dict({"final_sparsty": 0.5})
    Traceback (most recent call last):
    ...
    lightning_compress.core.configs.ConfigError: PruningConfig has no field 'final_sparsty' (did you mean \
'final_sparsity'?); its fields are: final_sparsity, granularity, scope, criterion, threshold, layer_sparsity, \
include, exclude, seed, round_to.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

from typing_extensions import dataclass_transform

from lightning_compress.core.checks import (
    ArgumentTypeError,
    Criterion,
    Observer,
    Scope,
    check_choice,
    check_flag,
    check_number,
    is_number,
)
from lightning_compress.core.clustering import ClusterInit
from lightning_compress.core.lowrank import Budget
from lightning_compress.core.masks import GRADIENT_CRITERIA, Granularity, parse_granularity
from lightning_compress.core.quantizers import check_bits
from lightning_compress.core.selection import EMBEDDINGS_REFUSED, as_patterns, load_layer_values

ScopeName = Literal["global", "layer"]
CriterionName = Literal["magnitude", "random", "threshold", "taylor", "movement"]
ObserverName = Literal["minmax", "lsq"]
BudgetName = Literal["params", "flops"]
ClusterInitName = Literal["linear", "kmeans++"]
ScheduleName = Literal["cubic", "linear"]

C = TypeVar("C", bound="TechniqueConfig")


class ConfigError(ValueError):
    """A config built with a key that is not one of its fields (the message names the fields it has)."""


def _unknown_field(cls: type, key: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{cls.__name__} has no field {key!r}{hint}; its fields are: {', '.join(names)}.")


@dataclass_transform()
def technique_config(cls: type[C]) -> type[C]:
    """Make ``cls`` a dataclass whose constructor names its fields when given one it does not have."""
    cls = dataclass(cls)
    generated = cls.__init__
    allowed = set(fields_of(cls))

    @functools.wraps(generated)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        for key in kwargs:
            if key not in allowed:
                raise _unknown_field(cls, key)
        generated(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


class TechniqueConfig:
    """What every technique config shares: ``from_dict`` / ``to_dict`` / ``replace``."""

    #: The technique's name in messages ("MagnitudePruning", ...).
    technique: ClassVar[str] = ""

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """A config from a mapping of its fields (a Hydra YAML's, a sweep's); a key that is no field is refused."""
        names = fields_of(cls)
        for key in values:
            if key not in names:
                raise _unknown_field(cls, str(key))
        return cls(**values)

    @property
    def per_layer(self) -> dict[str, Any]:
        """The per-layer overrides (``layer_sparsity``, ``layer_rank``, ``layer_clusters``, ``layer_bits``), read and
        checked: ``{pattern: value}`` (empty for a config without them)."""
        field_name = self.per_layer_field
        return dict(getattr(self, field_name) or {}) if field_name else {}

    @property
    def per_layer_field(self) -> str | None:
        """The name of the per-layer overrides' field (``"layer_sparsity"``, ...), for messages."""
        return next((n for n in fields_of(type(self)) if n.startswith("layer_")), None)

    @property
    def embeddings_refused(self) -> str | None:
        """Why this technique, so configured, cannot compress an embedding (``None``: it can, when ``include`` names
        it; see :func:`~lightning_compress.core.selection.select_modules`)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (what ``from_dict`` reads back into an equal config)."""
        return {name: getattr(self, name) for name in fields_of(type(self))}

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` (checked again)."""
        return type(self).from_dict({**self.to_dict(), **changes})


def fields_of(config: type) -> tuple[str, ...]:
    """The names of a config's fields, in order."""
    return tuple(f.name for f in dataclasses.fields(config) if f.init)


def resolve_config(cls: type[C], config: Any, first: str, fields: Mapping[str, Any]) -> C:
    """The config a verb works with: ``config`` itself, or one built from a number given in its place (the field
    ``first``, e.g. ``prune_(model, 0.5)``), a mapping, and keyword ``fields`` (which override)."""
    if isinstance(config, cls):
        return config.replace(**fields) if fields else config
    if isinstance(config, Mapping):
        return cls.from_dict({**config, **fields})
    if isinstance(config, TechniqueConfig):
        raise ArgumentTypeError(f"expected a {cls.__name__}, got a {type(config).__name__}.")
    return cls.from_dict(fields if config is None else {first: config, **fields})


def _patterns(config: Any) -> None:
    as_patterns("include", config.include)
    as_patterns("exclude", config.exclude)


def _layer_values(value: Any, argument: str) -> dict[str, Any]:
    if isinstance(value, (str, os.PathLike)):
        value = load_layer_values(value, argument)
    if value is not None and not isinstance(value, Mapping):
        raise ArgumentTypeError(
            f"`{argument}` must be a mapping {{layer pattern: value}} or a YAML path, got {value!r}."
        )
    return {str(p): v for p, v in dict(value or {}).items()}


# --------------------------------------------------------------------------- pruning
def check_sparsity(name: str, value: Any, granularity: Granularity) -> float:
    """A sparsity in [0, 1) — or in [0, N/M] for N:M, which reaches N/M exactly."""
    nm = granularity.kind == "nm"
    allowed = f"[0, {granularity.max_sparsity:g}] for granularity '{granularity}'" if nm else "[0, 1)"
    if not is_number(value):
        raise ArgumentTypeError(f"`{name}` must be a number in {allowed}, got {value!r}.")
    number = float(value)
    if math.isnan(number) or number < 0.0 or not (number <= granularity.max_sparsity if nm else number < 1.0):
        raise ValueError(f"`{name}` must be in {allowed}, got {value!r}.")
    return number


@technique_config
class PruningConfig(TechniqueConfig):
    """Which weights pruning removes (:func:`~lightning_compress.prune_`, :class:`~lightning_compress.MagnitudePruning`,
    whose docstring details each field; the callback adds the ramp: initial sparsity, epochs, schedule).

    Attributes:
        final_sparsity: Share of the selected weights that are zero, in [0, 1) (for N:M at most N/M; for
            ``granularity="channel"`` the share of channels removed).
        granularity: ``"unstructured"``, ``"channel"`` (Torch-Pruning's dependency groups) or ``"N:M"``.
        scope: ``"global"`` or ``"layer"``; ``None``: global for unstructured, layer otherwise.
        criterion: ``"magnitude"``, ``"random"``, ``"threshold"``, ``"taylor"`` or ``"movement"``.
        threshold: The magnitude below which ``criterion="threshold"`` prunes.
        layer_sparsity: ``{pattern: sparsity}`` per-layer overrides (or a YAML path).
        include: Regular expression(s) or ``@`` selectors of the layers.
        exclude: The layers left out of ``include``'s choice (the same kinds of patterns).
        seed: Seed of ``criterion="random"``.
        round_to: Channel groups keep a multiple of this many channels (``granularity="channel"``, scope layer).
    """

    technique: ClassVar[str] = "MagnitudePruning"

    final_sparsity: float = 0.9
    granularity: str = "unstructured"
    scope: ScopeName | None = None
    criterion: CriterionName = "magnitude"
    threshold: float | None = None
    layer_sparsity: Mapping[str, float] | str | os.PathLike | None = None
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    seed: int = 0
    round_to: int | None = None
    parsed_granularity: Granularity = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        gran = self.parsed_granularity = parse_granularity(self.granularity)
        self.granularity = str(gran)
        self.final_sparsity = check_sparsity("final_sparsity", self.final_sparsity, gran)
        if self.scope is None:
            self.scope = "global" if gran.kind == "unstructured" else "layer"
        self.scope = check_choice("scope", self.scope, Scope).value  # type: ignore[assignment]
        if self.scope == "global" and gran.kind == "nm":
            raise ValueError(
                f"`scope='global'` ranks weights or channel groups across layers; N:M patterns are per layer "
                f"(granularity={self.granularity!r}). Use scope='layer'."
            )
        self.criterion = check_choice("criterion", self.criterion, Criterion).value  # type: ignore[assignment]
        if gran.kind == "channel" and self.criterion not in ("magnitude", *GRADIENT_CRITERIA):
            raise ValueError(
                f"criterion={self.criterion!r} is not offered with granularity='channel': channel groups are ranked "
                "by the L2 magnitude of all their coupled parameters (criterion='magnitude') or by gradients "
                "('taylor', 'movement')."
            )
        if gran.kind == "channel" and self.scope == "global" and self.criterion == "movement":
            raise ValueError(
                "criterion='movement' with granularity='channel' ranks each group on its own (scope='layer'): a global "
                "ranking divides each group's scores by their mean, and movement scores may be negative."
            )
        if self.criterion == "threshold":
            t = self.threshold
            if t is None or not is_number(t) or not math.isfinite(t) or t <= 0:
                raise ValueError(f"criterion='threshold' needs a finite `threshold` > 0, got {t!r}.")
            if gran.kind != "unstructured":
                raise ValueError(f"criterion='threshold' needs granularity='unstructured', got {self.granularity!r}.")
            self.threshold = float(t)
        elif self.threshold is not None:
            raise ValueError(f"`threshold` ({self.threshold!r}) is only used with criterion='threshold'.")
        self.layer_sparsity = {
            p: check_sparsity(f"layer_sparsity[{p!r}]", v, gran)
            for p, v in _layer_values(self.layer_sparsity, "layer_sparsity").items()
        }
        _patterns(self)
        self.seed = int(check_number("seed", self.seed, integer=True))
        self.round_to = check_number("round_to", self.round_to, 1, integer=True, optional=True)
        if self.round_to is not None and (gran.kind != "channel" or self.scope != "layer"):
            raise ValueError(
                "`round_to` rounds the channels each group keeps: it needs granularity='channel' and scope='layer'."
            )

    @property
    def embeddings_refused(self) -> str | None:
        return EMBEDDINGS_REFUSED.get(self.parsed_granularity.kind)


# --------------------------------------------------------------------------- low rank
@technique_config
class LowRankConfig(TechniqueConfig):
    """Which layers low-rank factorization keeps at which cost (:func:`~lightning_compress.low_rank_`,
    :class:`~lightning_compress.LowRankFactorization`, which adds the ramp).

    Attributes:
        ratio: The selected layers end with ``ratio``× fewer weights (or multiply-adds); > 1.
        budget: ``"params"`` or ``"flops"``.
        layer_rank: ``{pattern: rank}`` fixed ranks (or a YAML path).
        include: Regular expression(s) or ``@`` selectors of the layers.
        exclude: The layers left out of ``include``'s choice (the same kinds of patterns).
    """

    technique: ClassVar[str] = "LowRankFactorization"

    ratio: float = 4.0
    budget: BudgetName = "params"
    layer_rank: Mapping[str, int] | str | os.PathLike | None = None
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None

    def __post_init__(self) -> None:
        self.ratio = float(check_number("ratio", self.ratio, 1.0, low_open=True))
        self.budget = check_choice("budget", self.budget, Budget).value  # type: ignore[assignment]
        self.layer_rank = {
            p: int(check_number(f"layer_rank[{p!r}]", r, 1, integer=True))
            for p, r in _layer_values(self.layer_rank, "layer_rank").items()
        }
        _patterns(self)

    @property
    def embeddings_refused(self) -> str | None:
        return EMBEDDINGS_REFUSED["low_rank"]


# --------------------------------------------------------------------------- clustering
def check_cluster_count(name: str, value: object) -> int:
    """A number of clusters: an integer of at least 2 (one value is not clustering, it is a constant)."""
    return int(check_number(name, value, 2, integer=True))


@technique_config
class ClusteringConfig(TechniqueConfig):
    """How many shared values each layer's weights get (:func:`~lightning_compress.cluster_weights_`,
    :class:`~lightning_compress.WeightClustering`, which adds when to cluster and when to freeze).

    Attributes:
        clusters: Values each layer's non-zero weights share (at least 2).
        init: ``"linear"`` or ``"kmeans++"``.
        layer_clusters: ``{pattern: k}`` per-layer numbers of clusters (or a YAML path).
        include: Regular expression(s) or ``@`` selectors of the layers.
        exclude: The layers left out of ``include``'s choice (the same kinds of patterns).
        seed: Seed of the k-means++ initialisation.
    """

    technique: ClassVar[str] = "WeightClustering"

    clusters: int = 16
    init: ClusterInitName = "linear"
    layer_clusters: Mapping[str, int] | str | os.PathLike | None = None
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.clusters = check_cluster_count("clusters", self.clusters)
        self.init = check_choice("init", self.init, ClusterInit).value  # type: ignore[assignment]
        self.layer_clusters = {
            p: check_cluster_count(f"layer_clusters[{p!r}]", k)
            for p, k in _layer_values(self.layer_clusters, "layer_clusters").items()
        }
        _patterns(self)
        self.seed = int(check_number("seed", self.seed, integer=True))


# --------------------------------------------------------------------------- distillation
@technique_config
class DistillationConfig(TechniqueConfig):
    """How a student learns from teachers' outputs (:func:`~lightning_compress.distillation_loss`,
    :class:`~lightning_compress.KnowledgeDistillation`, which adds the teachers and the Trainer wiring).

    Attributes:
        temperature: Softmax temperature of the soft targets, > 0.
        alpha: Weight of the distillation term; ``1 - alpha`` weighs the task loss. In [0, 1].
        feature_weight: Weight of the feature (hint) terms, >= 0.
    """

    technique: ClassVar[str] = "KnowledgeDistillation"

    temperature: float = 4.0
    alpha: float = 0.5
    feature_weight: float = 1.0

    def __post_init__(self) -> None:
        self.temperature = float(check_number("temperature", self.temperature, 0, low_open=True))
        self.alpha = float(check_number("alpha", self.alpha, 0, 1))
        self.feature_weight = float(check_number("feature_weight", self.feature_weight, 0))


# --------------------------------------------------------------------------- quantization
def check_range(name: str, value: Any) -> tuple[float, float] | None:
    """A bounded activation's ``(low, high)`` (``None`` passes)."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a pair (low, high), e.g. (-1, 1) after tanh; got {value!r}.") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"`{name}` must be finite with low < high, got {value!r}.")
    return lo, hi


def check_activation_bits(name: str, bits: Any, fixed_range: tuple[float, float] | None) -> int:
    """Activation bits: 2–8, or 1 (binary) with a fixed range."""
    if bits == 1 and not isinstance(bits, bool) and fixed_range is None:
        raise ValueError(
            f"`{name}`=1 is the binary quantizer for bounded activations and needs `activation_range` "
            "(e.g. (-1, 1) after tanh, (0, 1) after sigmoid); otherwise use 2 to 8 bits."
        )
    return check_bits(name, bits, low=1 if fixed_range is not None else 2)


@technique_config
class QATConfig(TechniqueConfig):
    """How :func:`~lightning_compress.prepare_qat` (and :func:`~lightning_compress.quantize_`) quantizes a model's
    Conv and Linear layers (checked when built).

    Attributes:
        weight_bits: Bits of the weights, 2–8.
        activation_bits: Bits of the input activations, 2–8 (1: binary, with ``activation_range``).
        per_channel: Weight scales per output channel (``True``) or per tensor.
        weight_symmetric: Symmetric weights with zero-point 0 (``True``) or affine.
        activation_symmetric: Signed symmetric activations, or unsigned affine (``False``, the default).
        observer: ``"minmax"`` or ``"lsq"`` (learned step sizes).
        fold_bn: Fold a Conv's BatchNorm into its quantized weight.
        layer_bits: ``{pattern: bits}`` (weight bits) or ``{pattern: {"weight_bits": b, "activation_bits": b,
            "activation_range": (lo, hi)}}`` per-layer overrides; patterns are regular expressions or selectors such as
            ``"@first"`` / ``"@last"`` (see :mod:`lightning_compress.core.selection`); a YAML path works too.
        include: Regular expression(s) or selectors of the layers to quantize.
        exclude: Regular expression(s) or selectors of layers to leave in float.
        averaging_constant: Weight of a new batch in the activation observers' moving average, in (0, 1].
        activation_range: ``(low, high)`` of bounded input activations (tanh: ``(-1, 1)``, sigmoid: ``(0, 1)``).
        quantize_outputs: Quantize every tensor an integer kernel reads or writes, once (the default; see
            :func:`~lightning_compress.quantization.prepare.quantization_plan`): layer outputs, and the inputs and
            outputs of residual additions. ONNX Runtime then runs the export on integer kernels only; without it the
            int8 file ran slower than fp32.

    Example:
        >>> from torch import nn
        >>> from lightning_compress import prepare_qat
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
        >>> sorted(prepare_qat(net, QATConfig(weight_bits=4, layer_bits={"@last": 8})))
        ['0', '4']
        >>> net[4].weight_quantizer.spec.bits, net[0].weight_quantizer.spec.bits
        (8, 4)
    """

    technique: ClassVar[str] = "QuantizationAwareTraining"

    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    weight_symmetric: bool = True
    activation_symmetric: bool = False
    observer: ObserverName = "minmax"
    fold_bn: bool = True
    layer_bits: Mapping[str, Any] | str | os.PathLike | None = None
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    averaging_constant: float = 0.01
    activation_range: Sequence[float] | None = None
    quantize_outputs: bool = True
    overrides: dict[str, dict[str, Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.weight_bits = check_bits("weight_bits", self.weight_bits)
        self.activation_range = check_range("activation_range", self.activation_range)
        self.activation_bits = check_activation_bits("activation_bits", self.activation_bits, self.activation_range)
        self.observer = check_choice("observer", self.observer, Observer).value  # type: ignore[assignment]
        for name in ("per_channel", "weight_symmetric", "activation_symmetric", "fold_bn", "quantize_outputs"):
            check_flag(name, getattr(self, name))
        self.averaging_constant = float(check_number("averaging_constant", self.averaging_constant, 0, 1,
                                                     low_open=True))  # fmt: skip
        self.layer_bits = _layer_values(self.layer_bits, "layer_bits")
        self.overrides = {p: self._parse_override(p, v) for p, v in self.layer_bits.items()}
        _patterns(self)

    def _parse_override(self, pattern: str, value: Any) -> dict[str, Any]:
        where = f"layer_bits[{pattern!r}]"
        if not isinstance(value, Mapping):
            return {"weight_bits": check_bits(where, value)}
        unknown = set(value) - {"weight_bits", "activation_bits", "activation_range"}
        if unknown:
            raise ValueError(
                f"`{where}` keys must be 'weight_bits' / 'activation_bits' / 'activation_range', got {sorted(unknown)}."
            )
        out: dict[str, Any] = {}
        if "activation_range" in value:
            out["activation_range"] = check_range(f"{where}['activation_range']", value["activation_range"])
        if "weight_bits" in value:
            out["weight_bits"] = check_bits(f"{where}['weight_bits']", value["weight_bits"])
        if "activation_bits" in value:
            fixed = out.get("activation_range", self.activation_range)
            out["activation_bits"] = check_activation_bits(
                f"{where}['activation_bits']", value["activation_bits"], fixed
            )
        return out
