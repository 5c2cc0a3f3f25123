"""Weight clustering without a Trainer: which layers with how many clusters, and one-shot clustering of any
nn.Module."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.clustering import check_clusters, cluster, distinct_nonzero, project
from lightning_compress.core.compiled import accepts_compiled
from lightning_compress.core.configs import ClusteringConfig, resolve_config
from lightning_compress.core.selection import (
    check_overrides_match,
    match_overrides,
    select_for,
    weights_of,
)


def clustered_layers(
    model: nn.Module, config: ClusteringConfig, selected: Sequence[tuple[str, nn.Module]] | None = None
) -> tuple[list[tuple[str, nn.Module]], Mapping[str, Tensor], dict[str, int]]:
    """The layers ``config`` selects, their weights and each one's number of clusters (``layer_clusters`` overrides
    ``clusters``). :func:`cluster_weights_` and :class:`~lightning_compress.WeightClustering` (with the layers it
    ``selected``: frozen ones left out) both start here.

    A constant layer (a zero- or constant-initialised head: at most one distinct non-zero weight) is left out, named in
    one warning, unless ``layer_clusters`` gives it its own number.

    Raises:
        ValueError: A ``layer_clusters`` pattern that matches no selected layer, a layer with fewer distinct non-zero
            weights than its own ``layer_clusters`` (named), or every selected layer constant.
    """
    if selected is None:  # the verb (a callback passes the layers it selected, and has said what it leaves)
        selected = select_for(model, config)
    selected = list(selected)
    overrides = config.per_layer
    check_overrides_match(selected, overrides, "layer_clusters")
    weights = weights_of(selected)
    counts, constant = {}, {}
    for name, weight in weights.items():
        own = match_overrides(name, overrides, selected)
        counts[name] = config.clusters if own is None else int(own)
        if own is None and len(selected) > 1 and (distinct := distinct_nonzero(weight)) <= 1 < counts[name]:
            constant[name] = distinct  # e.g. a zero-initialised head: nothing to cluster (yet)
            continue
        check_clusters(name, weight, counts[name])
    if constant and len(constant) == len(selected):
        name = next(iter(constant))
        check_clusters(name, weights[name], counts[name])  # refused, named
    if constant:
        warnings.warn(
            f"{config.technique} leaves {len(constant)} constant layer(s) as they are (zero- or constant-initialised: "
            f"at most one distinct non-zero weight, nothing to cluster): "
            f"{', '.join(f'{n!r} ({k} distinct)' for n, k in constant.items())}. Give them their own number with "
            "`layer_clusters` to cluster them.",
            UserWarning,
            stacklevel=3,
        )
        selected = [(n, m) for n, m in selected if n not in constant]
        counts = {n: k for n, k in counts.items() if n not in constant}
    return selected, weights_of(selected), counts


@torch.no_grad()
@accepts_compiled()
def cluster_weights_(
    model: nn.Module, config: ClusteringConfig | int | Mapping[str, Any] | None = None, **fields: Any
) -> dict[str, tuple[Tensor, Tensor]]:
    """One-shot clustering: every selected layer's non-zero weights replaced in place by the nearest of ``clusters``
    k-means centroids (zeros stay zeros). Returns layer name → ``(codebook, assignment)`` (the codebook's last entry is
    the pruned weights' 0).

    Args:
        model: Any module.
        config: A :class:`~lightning_compress.ClusteringConfig`, or the number of clusters alone; keyword ``fields``
            of the config are accepted too (and override it).

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> books = cluster_weights_(net, ClusteringConfig(clusters=4))
        >>> all(torch.unique(net[i].weight).numel() == 4 for i in (0, 2))
        True
    """
    cfg = resolve_config(ClusteringConfig, config, "clusters", fields)
    _, weights, counts = clustered_layers(model, cfg)
    out = {}
    for name, weight in weights.items():
        centroids, assignment = cluster(weight, counts[name], cfg.init, cfg.seed)
        weight.copy_(project(centroids, assignment))
        out[name] = (centroids, assignment)
    return out
