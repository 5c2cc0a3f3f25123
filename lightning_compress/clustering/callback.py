"""WeightClustering: every selected layer's weights share k values (Deep Compression's weight sharing), trained.

While training, every selected layer keeps its shape and ``state_dict`` key, and its weight holds centroid values
only (plus exact zeros where pruning removed weights). The compact artifact (``save_compressed``) then stores each
clustered weight as ``⌈log2 k⌉``-bit indices plus its codebook; ONNX exports are unchanged (the weights are floats
taken from the codebook) and int8 when quantization-aware training follows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_compress.clustering.functional import clustered_layers
from lightning_compress.core.checks import check_number, parse_epoch, show_epoch
from lightning_compress.core.clustering import (
    check_clusters,
    cluster,
    cluster_sums,
    index_bits,
    member_means,
    nearest,
    project,
)
from lightning_compress.core.configs import ClusteringConfig, ClusterInitName
from lightning_compress.trainer.progress import (
    check_optimizers,
    check_within_max_epochs,
    optimizer_steps_per_epoch,
    resolve_epochs,
    scheduled_epoch_steps,
    structure_ends,
    warn_if_spawned,
)
from lightning_compress.trainer.tables import log_table
from lightning_compress.trainer.technique import StepwiseTechnique


class WeightClustering(StepwiseTechnique):
    r"""Weight clustering of a LightningModule's Conv and Linear weights (Han et al. 2016; TF Model Optimization's
    ``cluster_weights``): each selected layer's weights share ``clusters`` values, which are then trained.

    At ``start_epoch`` each layer's non-zero weights are clustered by k-means (initialised evenly over the weight
    range, ``init="linear"``, or by k-means++), and every weight is replaced by its centroid. Weights that are exactly
    zero then — those a :class:`~lightning_compress.MagnitudePruning` before it removed — form a cluster fixed at 0 and
    stay zero. Cluster a trained network (``start_epoch`` late in training, or fine-tune a trained model): with the
    assignments frozen, only ``k`` values per layer are left to learn.

    Until ``freeze_epoch`` the assignments are refreshed: every weight keeps a private float copy that its own gradient
    steps move, each centroid follows the mean of its members' copies, and every ``update_every_n_steps`` each weight
    moves to the centroid nearest its copy. From ``freeze_epoch`` (by default from the start, as Han et al.) the
    assignments are frozen and only the centroids train: before each optimizer step every member's gradient is
    replaced by its cluster's summed gradient (a centroid's gradient), after it each centroid is its members' mean. The
    weights hold centroid values after every step; resume is exact (codebooks and assignments are in the checkpoint).

    The gradient being a sum over a cluster, plain SGD needs a learning rate lowered by about the cluster size;
    Adam-type optimizers (the usual fine-tuning choice) are insensitive to the gradient's scale.

    Args:
        clusters: Values each layer's non-zero weights share (``k``, at least 2; 16 clusters are 4-bit indices).
        init: ``"linear"`` (centroids spaced evenly over the weight range, then k-means) or ``"kmeans++"``.
        start_epoch: When the weights are clustered (epochs, fractions allowed, or a share like ``"50%"``). ``None``:
            when every technique on the Trainer that changes the structure (a pruning ramp) has finished, else 0.
        freeze_epoch: From when the assignments are frozen (``None``: from ``start_epoch``).
        layer_clusters: ``{pattern: k}`` per-layer numbers of clusters (patterns as in ``include``; a YAML path works).
        include: Regular expression(s) or ``@`` selectors choosing the Conv/Linear layers (default: all).
        exclude: The layers left out of ``include``'s choice (the same kinds of patterns).
        update_every_n_steps: Optimizer steps between assignment refreshes before ``freeze_epoch`` (``None``: one per
            epoch).
        seed: Seed of the k-means++ initialisation.
        verbose: Print a line when the weights are clustered and at every refresh (rank zero only).
        finish_on_stop: When training stops before the weights are clustered and frozen (EarlyStopping, ``max_time``,
            ``max_steps``), apply the clusters (frozen) at the end of fit (default); ``False`` leaves the model where it
            stopped. Either way a warning says what was reached against what was asked.

    Raises:
        ValueError: Before the first step: ``clusters`` < 2 or above the number of distinct non-zero weights of a
            layer (named), a start before a pruning ramp ends (the zeros would still move), ``freeze_epoch`` before
            ``start_epoch``, ``update_every_n_steps`` with the assignments frozen from the start, a pattern that
            matches nothing, every selected layer frozen (a frozen one alone is left as it is, named).

    Example::

        pruning = MagnitudePruning(final_sparsity=0.9, end_epoch=12)
        clustering = WeightClustering(clusters=16)  # starts when the pruning ramp ends, the zeros stay zero
        trainer = pl.Trainer(max_epochs=20, callbacks=[pruning, clustering])
        trainer.fit(model, datamodule)
        save_compressed(model, "model.lcz")  # 4-bit indices + a 16-value codebook per layer
    """

    holds = "codebooks"

    def __init__(
        self,
        clusters: int = 16,
        init: ClusterInitName = "linear",
        start_epoch: float | str | None = None,
        freeze_epoch: float | str | None = None,
        layer_clusters: dict[str, int] | str | os.PathLike | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        update_every_n_steps: int | None = None,
        seed: int = 0,
        verbose: bool = False,
        finish_on_stop: bool = True,
    ) -> None:
        config = ClusteringConfig(clusters=clusters, init=init, layer_clusters=layer_clusters, include=include,
                                  exclude=exclude, seed=seed)  # fmt: skip
        super().__init__(config, verbose, finish_on_stop)
        self.config: ClusteringConfig = config
        self.clusters, self.init, self.seed = config.clusters, config.init, config.seed
        self.layer_clusters: dict[str, int] = config.per_layer
        self.start_epoch = parse_epoch("start_epoch", start_epoch, optional=True)
        self.freeze_epoch = parse_epoch("freeze_epoch", freeze_epoch, optional=True)
        self.update_every_n_steps = check_number("update_every_n_steps", update_every_n_steps, 1, integer=True,
                                                 optional=True)  # fmt: skip
        self._epochs: dict[str, float] = {}
        self._reset()

    @override
    def _reset(self) -> None:
        super()._reset()
        self._weights: Mapping[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        self._centroids: dict[str, Tensor] = {}
        self._assignment: dict[str, Tensor] = {}
        self._latent: dict[str, Tensor] = {}
        self._last_refresh_step = -1
        self._start_step = self._freeze_step = self._every = 0

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._new_model(trainer, pl_module, stage):
            return
        _, self._weights, self._counts = clustered_layers(pl_module, self.config, self.select(pl_module))
        self._epochs = self._resolve(trainer)
        self._bind(pl_module)
        warn_if_spawned(trainer, self.name, self.holds)

    def _resolve(self, trainer: pl.Trainer) -> dict[str, float]:
        """Epochs of the clustering and of the freeze; refuses a start before a structure-changing ramp ends."""
        epochs = resolve_epochs(trainer, "WeightClustering", {"start_epoch": self.start_epoch,
                                                               "freeze_epoch": self.freeze_epoch})  # fmt: skip
        ends = structure_ends(trainer, self)
        last = max(ends.values(), default=0.0)
        start = last if epochs["start_epoch"] is None else epochs["start_epoch"]
        assert start is not None
        if start < last - 1e-9:
            owner = next(n for n, e in ends.items() if e == last)
            raise ValueError(
                f"WeightClustering: `start_epoch` ({show_epoch(self.start_epoch)}) is before the {owner} ramp ends "
                f"(epoch {last:g}): weights pruned later would leave their clusters. Start at epoch {last:g} or later "
                "(start_epoch=None does)."
            )
        freeze = start if epochs["freeze_epoch"] is None else epochs["freeze_epoch"]
        if freeze < start - 1e-9:
            raise ValueError(
                f"WeightClustering: `freeze_epoch` ({show_epoch(self.freeze_epoch)}, epoch {freeze:g}) is before the "
                f"weights are clustered (epoch {start:g})."
            )
        if self.update_every_n_steps is not None and freeze <= start + 1e-9:
            raise ValueError(
                f"WeightClustering: `update_every_n_steps`={self.update_every_n_steps} refreshes the assignments "
                f"before `freeze_epoch`, but they are frozen from the start (epoch {start:g}). Set freeze_epoch after "
                "start_epoch, or leave update_every_n_steps=None."
            )
        check_within_max_epochs(trainer, self.name, "start_epoch", self.start_epoch, start,
                                "the weights would never be clustered")  # fmt: skip
        return {"start": start, "freeze": freeze}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_optimizers(trainer, pl_module, "WeightClustering")
        what = f"its schedule (clustering at epoch {self._epochs['start']:g})"
        per_epoch = scheduled_epoch_steps(trainer, self.name, what)
        self._start_step = round(self._epochs["start"] * per_epoch)
        self._freeze_step = round(self._epochs["freeze"] * per_epoch)
        self._every = self.update_every_n_steps or optimizer_steps_per_epoch(trainer, self.name)
        self._last_seen_step = trainer.global_step
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Clustering happens before a batch, after every callback has finished the previous step (a pruning ramp's
        # last mask update included), so that its zeros are those of the final masks.
        if not self._centroids and trainer.global_step >= self._start_step:
            self._cluster(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # Gradients here are accumulated over the step's batches, all-reduced under DDP and unscaled under AMP.
        if not self._centroids or self._latent:
            return
        for name, weight in self._weights.items():
            if weight.grad is not None:
                weight.grad.copy_(cluster_sums(weight.grad, self._assignment[name], len(self._centroids[name])))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "centroids": {n: c.cpu() for n, c in self._centroids.items()},
            "assignment": {n: a.to(torch.int16).cpu() for n, a in self._assignment.items()},
            "latent": {n: t.cpu() for n, t in self._latent.items()},
            "last_refresh_step": self._last_refresh_step,
        }

    # ------------------------------------------------------------------ internals
    @override
    def _restore(self, state: dict[str, Any]) -> None:
        centroids = state.get("centroids", {})
        if centroids and set(centroids) != set(self._weights):
            raise ValueError(
                f"The checkpoint's clustered layers {sorted(centroids)} are not those selected here "
                f"({sorted(self._weights)}). Use the include/exclude of the run that wrote it."
            )
        device = {n: w.device for n, w in self._weights.items()}
        self._centroids = {n: c.to(device[n]) for n, c in centroids.items()}
        self._assignment = {n: a.to(device[n], torch.long) for n, a in state.get("assignment", {}).items()}
        self._latent = {n: t.to(device[n]) for n, t in state.get("latent", {}).items()}
        self._last_refresh_step = int(state.get("last_refresh_step", -1))

    @torch.no_grad()
    def _cluster(self, trainer: pl.Trainer) -> None:
        for name, weight in self._weights.items():
            try:
                check_clusters(name, weight, self._counts[name])
            except ValueError as err:
                raise RuntimeError(f"WeightClustering at optimizer step {trainer.global_step}: {err}") from None
            centroids, assignment = cluster(weight, self._counts[name], self.init, self.seed)
            if trainer.world_size > 1:
                # Every rank holds the same weights; rank zero's codebook makes agreement a guarantee.
                centroids, assignment = trainer.strategy.broadcast((centroids, assignment), src=0)
            self._centroids[name], self._assignment[name] = centroids.to(weight), assignment.to(weight.device)
            if trainer.global_step < self._freeze_step:
                self._latent[name] = weight.detach().clone()
            weight.copy_(project(self._centroids[name], self._assignment[name]))
        self._last_refresh_step = trainer.global_step
        if self.verbose:
            rank_zero_info(f"WeightClustering: step {trainer.global_step}, clustered {self._counts}")

    @override
    @torch.no_grad()
    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, log: bool = True) -> None:
        if not self._centroids:
            return
        refresh = bool(self._latent) and (step - self._last_refresh_step >= self._every or step >= self._freeze_step)
        for name, weight in self._weights.items():
            centroids, assignment = self._centroids[name], self._assignment[name]
            if name in self._latent:
                latent = self._latent[name]
                latent += weight - project(centroids, assignment)  # each weight's own step since the last projection
                if refresh:
                    assignment = nearest(latent, centroids, assignment == len(centroids) - 1)
                    if trainer.world_size > 1:
                        assignment = trainer.strategy.broadcast(assignment, src=0)
                    self._assignment[name] = assignment
                centroids = member_means(latent, assignment, centroids)
            else:
                centroids = member_means(weight, assignment, centroids)
            self._centroids[name] = centroids
            weight.copy_(project(centroids, assignment))
        if refresh:
            self._last_refresh_step = step
            if step >= self._freeze_step:
                self._latent = {}  # assignments frozen: from now on only the centroids train
            if self.verbose:
                rank_zero_info(f"WeightClustering: step {step}, assignments refreshed")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not trainer.is_global_zero or not self._centroids:
            return
        rows = []
        for name, weight in self._weights.items():
            k = self._counts[name]
            rows.append([name, weight.numel(), int(torch.count_nonzero(weight)), k, index_bits(k)])
        log_table(trainer.loggers, "compress/clusters", ["layer", "params", "nonzero", "clusters", "index_bits"], rows,
                  trainer.default_root_dir)  # fmt: skip

    # ------------------------------------------------------------------ the end of fit
    @override
    def _goal(self) -> str:
        return f"clusters={self.clusters} (frozen)"

    @override
    def _reached(self) -> str:
        if not self._centroids:
            return "not clustered yet"
        return "clustered, assignments not frozen" if self._latent else "clustered and frozen"

    @override
    @torch.no_grad()
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._freeze_step = min(self._freeze_step, trainer.global_step)
        if not self._centroids:
            self._cluster(trainer)  # at or after the freeze step: no latent weights, the assignments are final
        elif self._latent:
            self._step(trainer, pl_module, trainer.global_step)  # a last refresh of the assignments, then frozen

    def schedule_epochs(self) -> list[float]:
        """The epochs of the clustering and of the freeze (known after ``setup``); see
        :class:`~lightning_compress.core.protocol.HasSchedule`."""
        return list(self._epochs.values())

    # ------------------------------------------------------------------ read-outs
    @property
    def codebooks(self) -> dict[str, Tensor]:
        """Layer name → its ``k`` shared non-zero values (known once the weights are clustered)."""
        return {n: c[:-1].clone() for n, c in self._centroids.items()}

    @property
    def assignments(self) -> dict[str, Tensor]:
        """Layer name → each weight's index into its codebook (``k`` for a pruned weight, which is 0)."""
        return {n: a.clone() for n, a in self._assignment.items()}

    @property
    @override
    def target_reached(self) -> bool:
        """Whether the weights are clustered and the assignments frozen (see
        :class:`~lightning_compress.CompressionTarget`)."""
        return bool(self._centroids) and not self._latent

    @property
    def weights(self) -> dict[str, Tensor]:
        """The clustered weight tensors, layer name → parameter (known after ``setup``)."""
        return dict(self._weights)

    @property
    def selected_layers(self) -> list[str]:
        """Names of the layers this callback clusters (known after ``setup``)."""
        return list(self._weights)
