"""Weight clustering (weight sharing): the WeightClustering callback and its one-shot Trainer-free form
:func:`cluster_weights_`.

The pure parts (k-means of a weight, nearest centroid, a centroid's gradient) are in
:mod:`lightning_compress.core.clustering`; the compact artifact stores a clustered weight as ``⌈log2 k⌉``-bit indices
plus its codebook (:func:`lightning_compress.save_compressed`).
"""

from lightning_compress.clustering.callback import WeightClustering
from lightning_compress.clustering.functional import cluster_weights_

__all__ = ["WeightClustering", "cluster_weights_"]
