"""Embeddings: left out by default and named with the `include` that selects them; selected, they are pruned
(unstructured), quantized (int8 rows in the ONNX file, looked up as integers) and clustered; the techniques that
cannot compress a lookup table refuse it with an `exclude` that works; a tied weight given two settings is refused."""

from __future__ import annotations

import re
import warnings

import lightning.pytorch as pl
import onnx
import pytest
import torch
from conftest import make_trainer, qat_steps
from torch import nn

from lightning_compress import (
    LowRankFactorization,
    MagnitudePruning,
    QuantizationAwareTraining,
    WeightClustering,
    cluster_weights_,
    export_onnx,
    load_compressed,
    low_rank_,
    onnx_parity,
    prepare_qat,
    prune_,
    save_compressed,
)
from lightning_compress.tasks import ClassificationModule, DigitsDataModule, PixelTransformer

EVERYTHING = ["@Linear", "@Embedding"]


def zeros(t: torch.Tensor) -> float:
    return float((t == 0).float().mean())


def pixel_module(**kwargs) -> ClassificationModule:
    pl.seed_everything(0)
    return ClassificationModule(PixelTransformer(dim=16, depth=1, heads=2, **kwargs))


def caught_messages(fn) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return " ".join(str(w.message) for w in caught)


def test_embeddings_are_left_out_by_default_and_the_advised_include_prunes_them_exactly():
    net = PixelTransformer(dim=16, depth=1, heads=2)
    message = caught_messages(lambda: prune_(net, final_sparsity=0.5, scope="layer"))
    advice = re.search(
        r"'tokens', 'positions' \(Embedding: embeddings are compressed only when .* names them: (include=\[.*?\])",
        message,
    )
    assert advice is not None, message
    assert zeros(net.tokens.weight) == pytest.approx(1 / 17)  # the padding row only: not pruned
    include = eval(advice.group(1).removeprefix("include="))  # the advice, followed as printed
    assert include == EVERYTHING
    again = PixelTransformer(dim=16, depth=1, heads=2)
    message = caught_messages(lambda: prune_(again, final_sparsity=0.5, scope="layer", include=include))
    assert "Embedding" not in message  # nothing is left out now
    for name in ("tokens", "positions", "blocks.0.attention.q", "head"):
        assert zeros(again.get_submodule(name).weight) == 0.5, name
    assert not again.tokens.weight[0].any()  # the padding row stays zero (its zeros count like any other)


def test_callbacks_prune_and_cluster_embeddings_while_training(tmp_path):
    module = pixel_module()
    pruning = MagnitudePruning(final_sparsity=0.6, scope="layer", end_epoch=1, include=EVERYTHING)
    make_trainer(tmp_path, max_epochs=2, callbacks=[pruning]).fit(module, DigitsDataModule())
    assert {"net.tokens", "net.positions"} <= set(pruning.masks)
    for name in ("net.tokens", "net.positions", "net.head"):
        assert (
            abs(zeros(module.get_submodule(name).weight) - 0.6) < 1 / module.get_submodule(name).weight.numel() + 1e-9
        )
    clustered = pixel_module()
    clustering = WeightClustering(clusters=8, include=EVERYTHING)
    make_trainer(tmp_path, max_epochs=1, callbacks=[clustering]).fit(clustered, DigitsDataModule())
    for name in ("net.tokens", "net.positions"):
        weight = clustered.get_submodule(name).weight
        assert torch.unique(weight[weight != 0]).numel() <= 8, name
    assert not clustered.net.tokens.weight[0].any()


@pytest.mark.parametrize(
    "what, verb, callback",
    [
        ("N:M", lambda m, **k: prune_(m, final_sparsity=0.5, granularity="2:4", **k),
         lambda **k: MagnitudePruning(final_sparsity=0.5, granularity="2:4", end_epoch=1, **k)),
        ("low rank", lambda m, **k: low_rank_(m, ratio=2.0, **k), lambda **k: LowRankFactorization(ratio=2.0, **k)),
    ],
)  # fmt: skip
def test_techniques_that_cannot_compress_a_lookup_refuse_it_alike_with_an_exclude_that_works(
    tmp_path, what, verb, callback
):
    with pytest.raises(ValueError, match=r"selects the embeddings 'tokens', 'positions', which") as refused:
        verb(PixelTransformer(dim=16, depth=1, heads=2), include=EVERYTHING)
    module = pixel_module()
    with pytest.raises(ValueError) as by_callback:
        make_trainer(tmp_path, max_epochs=1, callbacks=[callback(include=EVERYTHING)]).fit(module, DigitsDataModule())
    expected = str(refused.value).replace("'tokens', 'positions'", "'net.tokens', 'net.positions'")
    expected = expected.replace("^tokens$", r"^net\\.tokens$").replace("^positions$", r"^net\\.positions$")
    assert str(by_callback.value) == expected
    exclude = eval(re.search(r"exclude=(\[.*?\])", str(refused.value)).group(1))
    net = PixelTransformer(dim=16, depth=1, heads=2)
    verb(net, include=EVERYTHING, exclude=exclude)  # the advice, followed: it works
    if what == "N:M":
        groups = net.head.weight.reshape(-1, 4)
        assert int((groups != 0).sum(1).max()) <= 2


def test_channel_pruning_refuses_a_selected_embedding():
    with pytest.raises(ValueError, match=r"channel pruning cannot cut: an embedding's columns are the width"):
        prune_(PixelTransformer(dim=16, depth=1, heads=2), final_sparsity=0.5, granularity="channel",
               include=EVERYTHING, example_input=torch.rand(2, 1, 8, 8))  # fmt: skip


def test_quantized_embeddings_are_int8_rows_in_the_onnx_file_looked_up_as_integers(tmp_path):
    module = pixel_module()
    qat = QuantizationAwareTraining(start_epoch=0, calibration_steps=2, include=EVERYTHING)
    make_trainer(tmp_path, max_epochs=2, callbacks=[qat]).fit(module, DigitsDataModule())
    assert {"net.tokens", "net.positions"} <= set(qat.layers)
    dm = DigitsDataModule()
    dm.setup("test")
    x = next(iter(dm.test_dataloader()))[0]
    path = export_onnx(module, tmp_path / "p.onnx", x)
    proto = onnx.load(path)
    inits = {i.name: i for i in proto.graph.initializer}
    for name in ("net.tokens", "net.positions"):
        table = inits[f"{name}.weight_quantized"]
        assert table.data_type == onnx.TensorProto.INT8 and list(table.dims) == list(
            module.get_submodule(name).weight.shape
        )
        assert f"{name}.weight" not in inits
        assert not onnx.numpy_helper.to_array(inits["net.tokens.weight_quantized"])[0].any()  # the padding row: 0
    assert not [i.name for i in inits.values() if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]
    gathers = [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0].endswith("weight_quantized")]
    assert len(gathers) == 2  # the integer rows are looked up; only those rows are dequantized
    assert onnx_parity(module, path, dm.test_dataloader())["top1_agreement"] >= 0.995
    # the compact artifact: the model form loads back exactly; the deploy form holds the int8 rows and their scales
    save_compressed(module, tmp_path / "p.lcz")
    fresh = pixel_module()
    prepare_qat(fresh, include=EVERYTHING)
    load_compressed(tmp_path / "p.lcz", fresh)
    module.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), module(x))
    save_compressed(module, tmp_path / "d.lcz", deploy=True)
    deployed = load_compressed(tmp_path / "d.lcz")
    assert deployed["net.tokens.weight"].dtype == torch.int8 and deployed["net.tokens.weight_scale"].shape == (17,)


def test_gpt2_with_its_embeddings_quantized_keeps_no_float_weight_matrix(tmp_path):
    pytest.importorskip("transformers")
    from conftest import tiny_gpt2

    torch.manual_seed(0)
    model = tiny_gpt2()
    message = caught_messages(lambda: prepare_qat(model, include=EVERYTHING))
    assert "Tied weights" not in message and "Embedding" not in message  # the tied table is quantized for both readers
    ids = torch.randint(0, 64, (8, 16))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids).reshape(-1, 64), ids.reshape(-1)).backward()
        opt.step()
    model.eval()
    path = export_onnx(model, tmp_path / "g.onnx", ids)
    proto = onnx.load(path)
    matrices = [i for i in proto.graph.initializer if len(i.dims) == 2]
    assert matrices and all(i.data_type == onnx.TensorProto.INT8 for i in matrices), [
        (i.name, i.data_type) for i in matrices
    ]
    assert "m.transformer.wte.weight_quantized" in {i.name for i in matrices}


def test_a_tied_weight_given_two_settings_is_refused_naming_both():
    pytest.importorskip("transformers")
    from conftest import tiny_gpt2

    with pytest.raises(ValueError, match=r"'m.transformer.wte' and 'm.lm_head' share one weight \(tied\), but "
                                         r"`layer_sparsity` gives them None and 0.3"):  # fmt: skip
        prune_(tiny_gpt2(), final_sparsity=0.5, include=EVERYTHING, layer_sparsity={"lm_head": 0.3})
    with pytest.raises(ValueError, match=r"'m.transformer.wte' and 'm.lm_head' share one weight \(tied\), but "
                                         r"`layer_bits` gives them"):  # fmt: skip
        prepare_qat(tiny_gpt2(), include=EVERYTHING, layer_bits={"lm_head": 4})
    model = tiny_gpt2()  # the advice followed: one value for both
    prune_(model, final_sparsity=0.5, scope="layer", include=EVERYTHING, layer_sparsity={"lm_head|wte": 0.3})
    assert model.m.lm_head.weight is model.m.transformer.wte.weight
    assert abs(zeros(model.m.lm_head.weight) - 0.3) < 1e-3


def test_one_shot_verbs_compress_embeddings_too():
    net = PixelTransformer(dim=16, depth=1, heads=2)
    cluster_weights_(net, clusters=4, include=EVERYTHING)
    assert torch.unique(net.positions.weight).numel() <= 4
    x = torch.rand(4, 1, 8, 8)
    quantized = PixelTransformer(dim=16, depth=1, heads=2)
    prepare_qat(quantized, include=["@Embedding"])
    qat_steps(nn.Sequential(quantized), x, torch.arange(4), steps=1)
    rows = quantized.tokens.weight_quantizer(quantized.tokens.weight).detach()  # observes the current table first
    scale, _ = quantized.tokens.weight_quantizer.qparams()
    assert scale.shape == (17,)  # a scale per row (per token)
    steps = rows / scale[:, None]
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # every value on its row's grid
