"""The compact artifact loads back: load_compressed(path, model) restores a model built the same way, which then
computes exactly what the saved model computed — for every technique; the deploy form is the smallest file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress import (
    ClusteringConfig,
    LowRankConfig,
    PruningConfig,
    QATConfig,
    cluster_weights_,
    load_compressed,
    low_rank_,
    prepare_qat,
    prune_,
    quantize_,
    save_compressed,
)
from lightning_compress.analysis.artifact import compressed_size
from lightning_compress.analysis.report import model_report
from lightning_compress.quantization.prepare import all_quantizers
from lightning_compress.tasks import ResNet20, SmallCNN

X = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN((1, 8, 8), 10, width=8, hidden=32)


def trained_qat(model: nn.Module, config: QATConfig, steps: int = 4) -> nn.Module:
    """A few quantization-aware SGD steps (ranges observed in training mode, BatchNorm statistics moving)."""
    prepare_qat(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for i in range(steps):
        x = torch.randn(32, *X.shape[1:], generator=torch.Generator().manual_seed(i))
        loss = model(x).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def restored(model: nn.Module, fresh: nn.Module, tmp_path, qat: dict | None = None) -> nn.Module:
    """Save ``model``, then restore it into ``fresh`` (prepared with ``QATConfig(**qat)`` first, when given)."""
    path = tmp_path / "m.lcz"
    save_compressed(model, path)
    if qat is not None:
        prepare_qat(fresh, QATConfig(**qat))
    return load_compressed(path, fresh).eval()


def assert_same_function(saved: nn.Module, back: nn.Module, x: torch.Tensor = X) -> None:
    with torch.no_grad():
        assert torch.equal(saved.eval()(x), back.eval()(x))


@pytest.mark.parametrize(
    "technique",
    ["plain", "unstructured", "2:4", "channel", "clustered", "pruned+clustered", "low_rank"],
)
def test_a_float_technique_restores_exactly(technique, tmp_path):
    model = cnn(0)
    model.train()(X)  # BatchNorm statistics that are not the initial ones
    model.eval()
    if technique in ("unstructured", "pruned+clustered"):
        prune_(model, PruningConfig(final_sparsity=0.8))
    if technique == "2:4":
        prune_(model, PruningConfig(final_sparsity=0.5, granularity="2:4", exclude="features.0"))
    if technique == "channel":
        pytest.importorskip("torch_pruning")
        prune_(model, PruningConfig(final_sparsity=0.5, granularity="channel"), example_input=X)
    if technique in ("clustered", "pruned+clustered"):
        cluster_weights_(model, ClusteringConfig(clusters=8))
    if technique == "low_rank":
        low_rank_(model, LowRankConfig(ratio=3))
    back = restored(model, cnn(1), tmp_path)
    assert_same_function(model, back)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values(), strict=True))


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"weight_symmetric": False},  # affine weights: their zero-points travel
        {"weight_bits": 4, "layer_bits": {"@last": 8}},
        {"observer": "lsq"},
        {"fold_bn": False, "per_channel": False},
    ],
    ids=["int8", "affine", "w4", "lsq", "unfolded-per-tensor"],
)
def test_a_qat_model_restores_exactly(config, tmp_path):
    model = trained_qat(cnn(0), QATConfig(**config))
    back = restored(model, cnn(1), tmp_path, config)
    assert_same_function(model, back)
    # what makes it small: the integers, not the floats, of every quantized weight
    stored = load_compressed(tmp_path / "m.lcz")
    assert stored["features.0.weight"].dtype == (torch.int8 if config.get("weight_symmetric", True) else torch.uint8)
    save_compressed(model, tmp_path / "d.lcz", deploy=True)
    deployed = load_compressed(tmp_path / "d.lcz")  # the integer model: affine weights keep their zero-points
    assert ("features.0.weight_zero_point" in deployed) == (not config.get("weight_symmetric", True))


def test_a_residual_qat_network_restores_with_its_tensor_quantizers(tmp_path):
    torch.manual_seed(0)
    model = trained_qat(ResNet20((1, 8, 8), 10, width=8), QATConfig())
    stored_keys = set(model.state_dict())
    assert any(k.endswith("output_quantizer.scale") and "conv" not in k for k in stored_keys)  # residual additions
    torch.manual_seed(1)
    back = restored(model, ResNet20((1, 8, 8), 10, width=8), tmp_path, {})
    assert_same_function(model, back)


def test_a_model_saved_before_quantization_started_restores_in_float(tmp_path):
    model = cnn(0)
    prepare_qat(model, QATConfig())
    model.train()(X)
    for quantizer in all_quantizers(model):
        quantizer.quantizing = False  # the callback's float phase (before start_epoch)
    back = restored(model, cnn(1), tmp_path, {})
    assert not any(q.quantizing for q in all_quantizers(back))
    assert_same_function(model, back)


def test_a_post_training_quantized_model_restores_exactly(tmp_path):
    model = cnn(0).eval()
    quantize_(model, QATConfig(), [X])
    back = restored(model, cnn(1), tmp_path, {"weight_bits": 8})
    assert_same_function(model, back)


def test_the_deploy_form_is_smaller_and_says_it_does_not_load_into_a_model(tmp_path):
    model = cnn(0)
    model.train()(X)
    model.eval()
    prune_(model, PruningConfig(final_sparsity=0.9, scope="layer", exclude="features.0"))
    cluster_weights_(model, ClusteringConfig(clusters=16, exclude="features.0"))
    deploy = save_compressed(model, tmp_path / "d.lcz", deploy=True)
    assert deploy < compressed_size(model)
    stored = load_compressed(tmp_path / "d.lcz")
    assert not any("running_var" in k for k in stored)  # BatchNorm statistics folded
    # a clustered convolution keeps its codebook: its BatchNorm is stored as a scale and a shift
    bn, conv = model.features[4], model.features[3]
    h = torch.randn(4, 8, 8, 8)
    with torch.no_grad():
        y = torch.nn.functional.conv2d(h, stored["features.3.weight"], None, padding=conv.padding)
        expected = bn(conv(h))
        got = y * stored["features.4.scale"].reshape(1, -1, 1, 1) + stored["features.4.shift"].reshape(1, -1, 1, 1)
    assert "features.3.bias" not in stored and "features.0.bias" in stored  # the unclustered one is folded
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"holds the deploy form .* its BatchNorms are folded.*save_compressed"):
        load_compressed(tmp_path / "d.lcz", cnn(1))


def test_the_deploy_form_of_a_float_network_folds_batchnorm_into_the_convolution(tmp_path):
    model = cnn(0)
    model.train()(X)
    model.eval()
    save_compressed(model, tmp_path / "d.lcz", deploy=True)
    stored = load_compressed(tmp_path / "d.lcz")
    conv = model.features[0]
    with torch.no_grad():
        got = torch.nn.functional.conv2d(X, stored["features.0.weight"], stored["features.0.bias"], padding=1)
        torch.testing.assert_close(got, model.features[1](conv(X)), rtol=1e-5, atol=1e-5)
    assert "features.1.weight" not in stored and "features.1.scale" not in stored


def test_another_model_or_version_is_refused_naming_what_differs(tmp_path):
    path = tmp_path / "m.lcz"
    save_compressed(cnn(0), path)
    wider = SmallCNN((1, 8, 8), 10, width=16, hidden=32)
    with pytest.raises(ValueError, match=r"is of another model: 'features.0.weight' is \(8, 1, 3, 3\) in the file, "):
        load_compressed(path, wider)
    with pytest.raises(
        ValueError, match=r"is of another model: it holds 'features.0.weight', which this model has not"
    ):
        load_compressed(path, nn.Sequential(nn.Linear(2, 2)))
    save_compressed(nn.Sequential(nn.Linear(2, 2)), tmp_path / "one.lcz")
    with pytest.raises(ValueError, match=r"is of another model: it has no '1.weight', which this model has"):
        load_compressed(tmp_path / "one.lcz", nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    qat = trained_qat(cnn(0), QATConfig(), steps=1)
    save_compressed(qat, path)
    with pytest.raises(ValueError, match=r"prepare this one with the same QATConfig first"):
        load_compressed(path, cnn(1))
    newer = path.read_bytes().replace(b"LCZ2", b"LCZ3", 1)
    (tmp_path / "new.lcz").write_bytes(newer)
    with pytest.raises(ValueError, match=r"format version 3, newer than this version reads \(2\)"):
        load_compressed(tmp_path / "new.lcz")
    save_compressed(cnn(0).state_dict(), tmp_path / "sd.lcz")
    with pytest.raises(ValueError, match=r"holds the tensors form .* it holds tensors only"):
        load_compressed(tmp_path / "sd.lcz", cnn(1))


def test_the_report_proves_the_artifact_restores_and_counts_the_deploy_form(tmp_path):
    model = trained_qat(cnn(0), QATConfig())
    report = model_report(model, tmp_path / "model.lcz", example_input=X)
    assert (tmp_path / "model.lcz").stat().st_size == report["size_bytes_artifact"]
    assert (tmp_path / "model.deploy.lcz").stat().st_size == report["size_bytes_compressed"]
    assert report["size_bytes_compressed"] < report["size_bytes_artifact"]
    assert_same_function(model, load_compressed(tmp_path / "model.lcz", prepare_and_return(cnn(1))))


def prepare_and_return(model: nn.Module) -> nn.Module:
    prepare_qat(model, QATConfig())
    return model


def test_a_v1_file_still_reads_as_tensors(tmp_path):
    import json
    import lzma
    import struct

    weight = torch.tensor([[0.0, 1.5], [2.0, 0.0]])
    import numpy as np

    mask = np.packbits(weight.numpy().ravel() != 0).tobytes()
    values = weight.numpy().ravel()[weight.numpy().ravel() != 0].astype("<f4").tobytes()
    header = [{"name": "w", "shape": [2, 2], "offset": 0, "sizes": [len(mask), len(values)], "kind": "sparse",
               "dtype": "float32"}]  # fmt: skip
    head = json.dumps(header).encode()
    (tmp_path / "v1.lcz").write_bytes(b"LCZ1" + struct.pack("<I", len(head)) + lzma.compress(head + mask + values))
    assert torch.equal(load_compressed(tmp_path / "v1.lcz")["w"], weight)
