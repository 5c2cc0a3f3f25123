"""Weight clustering without a Trainer: which layers with how many clusters, and one-shot clustering of any
nn.Module."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_compress.core.checks import check_choice, check_number
from lightning_compress.core.clustering import ClusterInit, check_clusters, cluster, project
from lightning_compress.core.selection import check_overrides_match, match_overrides, select_modules, weights_of


def check_cluster_count(name: str, value: object) -> int:
    """A number of clusters: an integer of at least 2 (one value is not clustering, it is a constant)."""
    return int(check_number(name, value, 2, integer=True))


def clustered_layers(
    model: nn.Module,
    clusters: int,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    layer_clusters: Mapping[str, int] | None = None,
) -> tuple[list[tuple[str, nn.Module]], dict[str, Tensor], dict[str, int]]:
    """The selected ``(name, module)`` pairs, their weights and each one's number of clusters (``layer_clusters``
    overrides ``clusters``).

    Raises:
        ValueError: A ``layer_clusters`` pattern that matches no selected layer, or a layer with fewer distinct
            non-zero weights than its clusters (named).
    """
    selected = select_modules(model, include, exclude)
    check_overrides_match(selected, layer_clusters, "layer_clusters")
    weights = weights_of(selected)
    counts = {}
    for name, weight in weights.items():
        own = match_overrides(name, layer_clusters, selected)
        counts[name] = clusters if own is None else int(own)
        check_clusters(name, weight, counts[name])
    return selected, weights, counts


@torch.no_grad()
def cluster_weights_(
    model: nn.Module,
    clusters: int = 16,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    layer_clusters: Mapping[str, int] | None = None,
    init: str = "linear",
    seed: int = 0,
) -> dict[str, tuple[Tensor, Tensor]]:
    """One-shot clustering: every selected layer's non-zero weights replaced in place by the nearest of ``clusters``
    k-means centroids (zeros stay zeros). Returns layer name → ``(codebook, assignment)`` (the codebook's last entry is
    the pruned weights' 0).

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> books = cluster_weights_(net, clusters=4)
        >>> [int(torch.unique(net[i].weight).numel()) for i in (0, 2)]
        [4, 4]
    """
    clusters = check_cluster_count("clusters", clusters)
    layer_clusters = {p: check_cluster_count(f"layer_clusters[{p!r}]", k) for p, k in (layer_clusters or {}).items()}
    init = check_choice("init", init, ClusterInit).value
    _, weights, counts = clustered_layers(model, clusters, include, exclude, layer_clusters)
    out = {}
    for name, weight in weights.items():
        centroids, assignment = cluster(weight, counts[name], init, seed)
        weight.copy_(project(centroids, assignment))
        out[name] = (centroids, assignment)
    return out
