"""Weight clustering (weight sharing, Han et al. 2016): the pure tensor operations behind
:class:`~lightning_compress.WeightClustering` and :func:`~lightning_compress.cluster_weights_`.

A clustered weight holds at most ``k`` distinct non-zero values (its *codebook*, the centroids) and exact zeros where
a pruning mask removed weights. A layer's state is two tensors: ``centroids`` (``k`` floats, then a last entry fixed
at 0 for the pruned weights) and ``assignment`` (the index into ``centroids`` of every weight, in the weight's shape).

Example:
    >>> w = torch.tensor([[0.0, 0.11, 0.9], [0.12, 0.95, -0.5]])
    >>> centroids, assignment = cluster(w, 3)
    >>> project(centroids, assignment)  # every non-zero weight replaced by its centroid; zeros stay zeros
    tensor([[ 0.0000,  0.1150,  0.9250],
            [ 0.1150,  0.9250, -0.5000]])
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

from lightning_compress.core.checks import Choice


class ClusterInit(Choice):
    """Where the centroids start before k-means refines them."""

    LINEAR = "linear"
    KMEANS_PLUS_PLUS = "kmeans++"


def distinct_nonzero(weight: Tensor) -> int:
    """The number of distinct non-zero values in ``weight``."""
    values = weight.detach().flatten()
    return int(torch.unique(values[values != 0]).numel())


def index_bits(clusters: int) -> int:
    """Bits of one index into a codebook of ``clusters`` values (at least 1).

    Example:
        >>> [index_bits(k) for k in (2, 3, 16, 17, 256)]
        [1, 2, 4, 5, 8]
    """
    return max(1, math.ceil(math.log2(clusters)))


def check_clusters(name: str, weight: Tensor, clusters: int) -> None:
    """Refuse ``clusters`` for a layer with fewer distinct non-zero weights (clusters would stay empty).

    Raises:
        ValueError: ``weight`` holds at most ``clusters`` distinct non-zero values; the message names the layer.
    """
    distinct = distinct_nonzero(weight)
    if clusters > distinct:
        raise ValueError(
            f"layer {name!r} holds {distinct} distinct non-zero weights, fewer than clusters={clusters}: some clusters "
            "would stay empty. Give it fewer clusters (`layer_clusters`) or leave it out with `exclude`."
        )


def cluster(weight: Tensor, clusters: int, init: str = "linear", seed: int = 0) -> tuple[Tensor, Tensor]:
    """k-means (scikit-learn's :class:`~sklearn.cluster.KMeans`, one dimension) of a weight's non-zero values.

    ``init="linear"`` starts from ``clusters`` values spaced evenly between the smallest and largest weight (Han et
    al. found it best: it keeps centroids for the few large weights); ``"kmeans++"`` from k-means++ seeding (``seed``).
    Zeros (pruned weights) are left out and keep the last centroid, fixed at 0.

    Returns:
        ``centroids`` (``clusters + 1`` values of the weight's dtype, the last 0) and ``assignment`` (int64, the
        weight's shape).
    """
    from sklearn.cluster import KMeans

    flat = weight.detach().flatten()
    nonzero = flat != 0
    values = flat[nonzero].double().cpu().numpy().reshape(-1, 1)
    if init == ClusterInit.LINEAR:
        start: str | np.ndarray = np.linspace(values.min(), values.max(), clusters).reshape(-1, 1)
    else:
        start = "k-means++"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on ties: the distinct count was checked before
        km = KMeans(n_clusters=clusters, init=start, n_init=1, random_state=seed, max_iter=100).fit(values)
    centers = torch.from_numpy(km.cluster_centers_.ravel())
    order = torch.argsort(centers)  # sorted codebook: index order follows value order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(clusters)
    assignment = torch.full(flat.shape, clusters, dtype=torch.long)
    assignment[nonzero.cpu()] = rank[torch.from_numpy(km.labels_).long()]
    centroids = torch.cat([centers[order], centers.new_zeros(1)]).to(weight.dtype)
    return centroids.to(weight.device), assignment.view(weight.shape).to(weight.device)


def nearest(values: Tensor, centroids: Tensor, zero: Tensor) -> Tensor:
    """Index of the nearest of ``centroids[:-1]`` (sorted) for every value; where ``zero`` is true, the last index
    (the pruned weights' fixed 0)."""
    codebook = centroids[:-1]
    order = torch.argsort(codebook)
    sorted_book = codebook[order]
    bounds = (sorted_book[1:] + sorted_book[:-1]) / 2
    index = order[torch.bucketize(values, bounds)]
    return torch.where(zero, torch.full_like(index, len(codebook)), index)


def member_means(values: Tensor, assignment: Tensor, centroids: Tensor) -> Tensor:
    """Each cluster's mean of ``values`` (an empty cluster keeps its centroid; the last, the zeros', stays 0)."""
    count = len(centroids)
    flat = assignment.flatten()
    sums = torch.zeros(count, dtype=torch.float64, device=values.device).index_add_(0, flat, values.flatten().double())
    sizes = torch.bincount(flat, minlength=count)
    means = torch.where(sizes > 0, sums / sizes.clamp(min=1), centroids.double())
    means[-1] = 0.0
    return means.to(centroids.dtype)


def cluster_sums(grad: Tensor, assignment: Tensor, count: int) -> Tensor:
    """Each cluster's sum of ``grad`` broadcast back to its members — a centroid's gradient (the sum of its members'
    gradients) given to every member, so that members that start equal stay equal. The zeros' cluster gets 0."""
    flat = assignment.flatten()
    sums = torch.zeros(count, dtype=grad.dtype, device=grad.device).index_add_(0, flat, grad.flatten())
    sums[-1] = 0
    return sums[flat].view_as(grad)


def project(centroids: Tensor, assignment: Tensor) -> Tensor:
    """The clustered weight: every entry its centroid's value."""
    return centroids[assignment]
