"""Low-rank factorization: the LowRankFactorization callback and its one-shot Trainer-free form :func:`low_rank_`.

The pure parts (matrix view, projection onto rank r, global rank choice under a budget) are in
:mod:`lightning_compress.core.lowrank`; the factorized export is :func:`lightning_compress.export_compact`.
"""

from lightning_compress.core.lowrank import choose_ranks, project_rank_
from lightning_compress.lowrank.callback import LowRankFactorization
from lightning_compress.lowrank.functional import low_rank_

__all__ = ["LowRankFactorization", "choose_ranks", "low_rank_", "project_rank_"]
