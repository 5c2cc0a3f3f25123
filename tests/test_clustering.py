"""Weight clustering: k-means of a weight, the callback (k values per layer, zeros kept with pruning, centroids trained
with frozen assignments or refreshed ones, resume exact, DDP identical, bad input refused before the first step), the
compact artifact (indices + codebook, read back exactly) and the ONNX export."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import assert_same_on_every_rank, make_trainer, small_module
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_compress import (
    MagnitudePruning,
    QuantizationAwareTraining,
    WeightClustering,
    cluster_weights_,
    compression_summary,
    load_compressed,
    save_compressed,
)
from lightning_compress.analysis.artifact import fp32_size_bytes
from lightning_compress.core.clustering import cluster, cluster_sums, nearest, project
from lightning_compress.tasks import DigitsDataModule


def distinct(weight: torch.Tensor) -> int:
    values = weight.detach().flatten()
    return int(torch.unique(values[values != 0]).numel())


def layer_weights(module) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


# --------------------------------------------------------------------------- pure parts
def test_kmeans_keeps_zeros_and_gives_a_sorted_codebook():
    torch.manual_seed(0)
    weight = torch.randn(64, 32)
    weight[weight.abs() < 0.5] = 0.0
    centroids, assignment = cluster(weight, 8)
    clustered = project(centroids, assignment)
    assert torch.equal(clustered == 0, weight == 0)  # pruned weights stay exactly zero
    assert distinct(clustered) == 8 and centroids[-1] == 0
    assert torch.all(centroids[:-2] < centroids[1:-1])  # sorted: index order is value order
    # every weight sits in its nearest cluster (k-means converged) ...
    assert torch.equal(nearest(weight, centroids, weight == 0), assignment)
    # ... and linear initialisation differs from k-means++ but both are k-means solutions of the same data
    other, _ = cluster(weight, 8, init="kmeans++", seed=1)
    assert other.shape == centroids.shape


def test_a_centroids_gradient_is_the_sum_of_its_members():
    grad = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assignment = torch.tensor([0, 1, 0, 2, 1])  # index 2 is the zeros' cluster of a 2-cluster codebook
    assert cluster_sums(grad, assignment, 3).tolist() == [4.0, 7.0, 4.0, 0.0, 7.0]


def test_one_shot_clustering_on_any_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    books = cluster_weights_(net, clusters=16, layer_clusters={"^2$": 4})
    assert distinct(net[0].weight) == 16 and distinct(net[2].weight) == 4
    assert torch.equal(project(*books["0"]), net[0].weight)


# --------------------------------------------------------------------------- the callback
def fit(tmp_path, callbacks, module=None, **kwargs):
    module = module or small_module()
    datamodule = DigitsDataModule()
    trainer = make_trainer(tmp_path, callbacks=callbacks, **kwargs)
    trainer.fit(module, datamodule)
    return trainer, module, datamodule


class _Distinct(Callback):
    """Records every selected layer's distinct non-zero values after every optimizer step."""

    def __init__(self):
        self.seen: list[dict[str, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append({n: distinct(w) for n, w in layer_weights(pl_module).items()})


def test_after_pruning_every_layer_shares_k_values_and_the_zeros_stay(tmp_path):
    pl.seed_everything(0)
    pruning = MagnitudePruning(final_sparsity=0.8, end_epoch=2)
    clustering = WeightClustering(clusters=8, layer_clusters={"classifier.3": 4})
    probe = _Distinct()
    trainer, module, dm = fit(tmp_path, [pruning, clustering, probe], max_epochs=4)
    expected = {n: 4 if n.endswith("classifier.3") else 8 for n in layer_weights(module)}
    steps_per_epoch = trainer.num_training_batches
    for seen in probe.seen[2 * steps_per_epoch :]:  # from the end of the pruning ramp on, after every step
        assert seen == expected
    assert pruning.sparsity() == pytest.approx(0.8, abs=1e-3)
    for name, weight in clustering._weights.items():
        assert torch.equal(weight == 0, ~pruning.masks[name])  # the zeros are the masks' zeros
        assert torch.equal(project(clustering._centroids[name], clustering.assignments[name]), weight)
    assert clustering.target_reached
    # the centroids trained: the codebooks at the end differ from k-means of the weights when clustering started
    assert trainer.test(module, dm, verbose=False)[0]["test/acc"] > 0.8


def test_centroids_train_with_frozen_assignments(tmp_path):
    pl.seed_everything(0)
    module = small_module()
    books = []

    class Books(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            books.append(clustering.codebooks)
            assignments.append(clustering.assignments)

    assignments: list = []
    clustering = WeightClustering(clusters=4, start_epoch=1)
    fit(tmp_path, [clustering, Books()], module=module, max_epochs=3)
    for name in books[0]:
        assert not torch.equal(books[1][name], books[2][name])  # centroids moved
        assert torch.equal(assignments[1][name], assignments[2][name])  # members did not


def test_refreshed_assignments_move_until_frozen(tmp_path):
    pl.seed_everything(0)
    assignments = []

    class Record(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            assignments.append(clustering.assignments)

    clustering = WeightClustering(clusters=4, start_epoch=0, freeze_epoch=2, update_every_n_steps=5)
    fit(tmp_path, [clustering, Record()], max_epochs=4)
    name = "net.classifier.1"
    assert not torch.equal(assignments[0][name], assignments[1][name])  # refreshed before freeze_epoch
    assert torch.equal(assignments[2][name], assignments[3][name])  # frozen after it
    assert clustering.target_reached


@pytest.mark.parametrize(("freeze_epoch", "resume_from"), [(3, 1), (2, 2)], ids=["refreshing", "frozen"])
def test_resume_equals_the_uninterrupted_run(tmp_path, freeze_epoch, resume_from):
    def callback():
        return WeightClustering(clusters=8, start_epoch=1, freeze_epoch=freeze_epoch, update_every_n_steps=5)

    pl.seed_everything(0)
    full_module, full_cb = small_module(), callback()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "full", filename="{epoch}", save_top_k=-1)
    fit(tmp_path / "full", [full_cb, ckpt], module=full_module, max_epochs=4, enable_checkpointing=True)
    pl.seed_everything(123)
    module, cb = small_module(), callback()
    trainer = make_trainer(tmp_path / "resumed", callbacks=[cb], max_epochs=4)
    trainer.fit(module, DigitsDataModule(seed=0), ckpt_path=tmp_path / "full" / f"epoch={resume_from}.ckpt")
    for (name, a), b in zip(full_module.state_dict().items(), module.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    for name, book in full_cb.codebooks.items():
        torch.testing.assert_close(book, cb.codebooks[name], rtol=0, atol=1e-6)
        assert torch.equal(full_cb.assignments[name], cb.assignments[name])


def test_clustered_model_artifact_stores_indices_and_codebooks(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    with torch.no_grad():
        net[0].weight[net[0].weight.abs() < 0.05] = 0.0
    dense_size = save_compressed(net, tmp_path / "dense.lcz")
    cluster_weights_(net, clusters=16)
    size = save_compressed(net, tmp_path / "clustered.lcz")
    back = load_compressed(tmp_path / "clustered.lcz")
    for key, value in net.state_dict().items():
        assert torch.equal(back[key], value), key  # exact, zeros included
    assert size < dense_size / 3  # 4-bit indices instead of 32-bit floats (the bitmask of zeros stays)
    rows = {r.name: r for r in compression_summary(net)}
    assert rows["0"].bits == 4 and rows["2"].bits == 4 and rows["1" if "1" in rows else "0"].packed_bytes > 0
    nonzero = int(torch.count_nonzero(net[0].weight))
    assert rows["0"].packed_bytes == 16 * 4 + (256 * 256 + 7) // 8 + (nonzero * 4 + 7) // 8 + 256 // 8 + 256 * 4
    assert fp32_size_bytes(net) / size > 7


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(clusters=1), r"`clusters` must be .*>= 2, got 1"),
        (dict(clusters=2.5), r"`clusters` must be an integer"),
        (dict(layer_clusters={"fc": 1}), r"`layer_clusters\['fc'\]` must be .*>= 2, got 1"),
        (dict(init="random"), r"`init` must be one of \('linear', 'kmeans\+\+'\), got 'random'"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeightClustering(**kwargs)


def test_bad_setups_are_refused_before_the_first_step(tmp_path):
    module = small_module()
    module.net.features[0].weight.requires_grad_(False)
    cases = [
        (
            small_module(),
            [WeightClustering(clusters=100)],
            r"layer 'net.features.0' holds 72 distinct non-zero weights, fewer than clusters=100.*`layer_clusters`",
        ),
        (small_module(), [WeightClustering(layer_clusters={"decoder": 4})], r"`layer_clusters` pattern 'decoder'"),
        (module, [WeightClustering(include="features.0")], r"every selected layer is frozen .*'net.features.0'"),
        (
            small_module(),
            [MagnitudePruning(end_epoch=2), WeightClustering(start_epoch=1)],
            r"`start_epoch` \(1\) is before the MagnitudePruning ramp ends \(epoch 2\)",
        ),  # fmt: skip
        (small_module(), [WeightClustering(start_epoch=2, freeze_epoch=1)], r"`freeze_epoch` \(1, epoch 1\) is before"),
        (
            small_module(),
            [WeightClustering(start_epoch=9)],
            r"WeightClustering\(start_epoch=9\) is past the end of Trainer\(max_epochs=3\)",
        ),
        (
            small_module(),
            [WeightClustering(start_epoch=1, update_every_n_steps=5)],
            r"`update_every_n_steps`=5 refreshes the assignments before `freeze_epoch`, but they are frozen from",
        ),
    ]
    for module, callbacks, message in cases:
        trainer = make_trainer(tmp_path, callbacks=callbacks, max_epochs=3)
        with pytest.raises(ValueError, match=message):
            trainer.fit(module, DigitsDataModule())
        assert trainer.global_step == 0


def test_a_frozen_layer_is_left_as_it_is_and_named(tmp_path):
    """The one frozen-layer policy of every technique that rewrites weights while training."""
    module = small_module()
    module.net.features[0].weight.requires_grad_(False)
    before = module.net.features[0].weight.detach().clone()
    clustering = WeightClustering(clusters=8, start_epoch=1)
    with pytest.warns(
        UserWarning, match=r"WeightClustering leaves 1 frozen layer\(s\) .* as they are: 'net.features.0'"
    ):
        make_trainer(tmp_path, callbacks=[clustering], max_epochs=2).fit(module, DigitsDataModule())
    assert "net.features.0" not in clustering.codebooks and torch.equal(module.net.features[0].weight, before)
    assert all(int(torch.unique(w).numel()) <= 9 for w in clustering.weights.values())  # 8 values (and 0)


def test_clustering_then_int8_qat_exports_with_parity(tmp_path):
    onnx = pytest.importorskip("onnxruntime")
    del onnx
    from lightning_compress import export_onnx, onnx_parity
    from lightning_compress.export.onnx import PARITY_GOAL

    pl.seed_everything(0)
    clustering = WeightClustering(clusters=16, start_epoch=1)  # a trained network is clustered, then quantized
    qat = QuantizationAwareTraining(start_epoch=2, freeze_bn_epoch=3)
    trainer, module, dm = fit(tmp_path, [clustering, qat], max_epochs=4)
    assert trainer.test(module, dm, verbose=False)[0]["test/acc"] > 0.8
    path = export_onnx(module, tmp_path / "m.onnx", torch.zeros(2, 1, 8, 8))
    assert onnx_parity(module, path, dm.test_dataloader())["top1_agreement"] >= PARITY_GOAL


class _SameCodebooksOnEveryRank(Callback):
    def __init__(self, clustering):
        self.clustering = clustering

    def on_train_end(self, trainer, pl_module):
        cb = self.clustering
        tensors = [*cb.codebooks.values(), *(a.float() for a in cb.assignments.values()), *cb._weights.values()]
        assert_same_on_every_rank(trainer, tensors)


@pytest.mark.slow
def test_ddp_spawn_identical_codebooks_and_weights(tmp_path):
    pl.seed_everything(0)
    clustering = WeightClustering(clusters=8, start_epoch=0, freeze_epoch=1, update_every_n_steps=4)
    trainer = make_trainer(tmp_path, callbacks=[clustering, _SameCodebooksOnEveryRank(clustering)], max_epochs=2,
                           strategy="ddp_spawn", devices=2)  # fmt: skip
    trainer.fit(small_module(), DigitsDataModule())
