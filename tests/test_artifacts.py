import torch
from conftest import small_module

from lightning_compress import load_compressed, model_report, save_compressed
from lightning_compress.analysis.report import fp32_size_bytes
from lightning_compress.pruning.functional import prune_


def test_roundtrip_is_exact_and_sparse_is_smaller(tmp_path):
    torch.manual_seed(0)
    module = small_module(width=16, hidden=64)
    dense_size = save_compressed(module, tmp_path / "dense.lcz")
    prune_(module, 0.9)
    sparse_size = save_compressed(module, tmp_path / "sparse.lcz")
    loaded = load_compressed(tmp_path / "sparse.lcz")
    state = module.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value.float() if value.is_floating_point() else value), key
    assert sparse_size < dense_size / 5
    assert (tmp_path / "sparse.lcz").stat().st_size == sparse_size


def test_model_report_fields(tmp_path):
    torch.manual_seed(0)
    module = small_module()
    masks = prune_(module, 0.8)
    report = model_report(module, tmp_path / "m.lcz", selected=list(masks))
    selected = sum(m.numel() for m in masks.values())
    assert report["sparsity"] == 1 - (selected - round(0.8 * selected)) / selected
    assert report["params"] == sum(p.numel() for p in module.parameters())
    assert report["nonzero_params"] == sum(int(torch.count_nonzero(p)) for p in module.parameters())
    assert report["size_bytes_fp32"] == fp32_size_bytes(module)
    assert report["compression_ratio"] == report["size_bytes_fp32"] / report["size_bytes_compressed"]


def test_bad_file(tmp_path):
    import pytest

    (tmp_path / "x.lcz").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="is not a lightning-compress artifact"):
        load_compressed(tmp_path / "x.lcz")


def test_quantized_model_artifact_stores_the_export_integers(tmp_path):
    import lightning.pytorch as pl
    from conftest import make_trainer

    from lightning_compress import MagnitudePruning, QuantizationAwareTraining
    from lightning_compress.export.onnx import export_form
    from lightning_compress.tasks import DigitsDataModule

    pl.seed_everything(0)
    module = small_module(width=16, hidden=64)
    callbacks = [
        MagnitudePruning(final_sparsity=0.9, end_epoch=1),
        QuantizationAwareTraining(start_epoch=1, calibration_steps=2),
    ]
    make_trainer(tmp_path, callbacks=callbacks, max_epochs=2).fit(module, DigitsDataModule())
    size = save_compressed(module, tmp_path / "q.lcz", deploy=True)  # the deploy form: the integer model
    loaded = load_compressed(tmp_path / "q.lcz")
    _, info, _ = export_form(module)
    for name, data in info.items():
        assert loaded[f"{name}.weight"].dtype == torch.int8
        assert torch.equal(loaded[f"{name}.weight"], data.weight_int)
        assert torch.equal(loaded[f"{name}.weight_scale"], data.weight_scale)
        assert f"{name}.weight_zero_point" not in loaded and not data.weight_zero_point.any()  # symmetric: all 0
    # quantizer bookkeeping is not part of the artifact: only the grids of the tensors quantized between layers
    assert not any(k.endswith(("min_val", "max_val")) or ".input_quantizer." in k for k in loaded)
    assert size * 20 < fp32_size_bytes({k: v for k, v in module.state_dict().items() if "_quantizer." not in k})


def test_flops_per_sample_counts_dense_multiply_adds_twice():
    import torch
    from torch import nn

    from lightning_compress.analysis.report import flops_per_sample

    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    expected = 2 * (4 * 6 * 6 * 9) + 2 * (4 * 6 * 6 * 10)  # 144 outputs x 9 weights; 144 inputs x 10 outputs
    assert flops_per_sample(conv, torch.zeros(5, 1, 8, 8)) == expected
    with torch.no_grad():
        conv[0].weight[:2] = 0.0  # pruned weights are still multiplied: the count is of the dense network
    assert flops_per_sample(conv, torch.zeros(5, 1, 8, 8)) == expected
