"""Linear-like layers are layers (issue 19, item 2): Hugging Face's ``Conv1D`` (GPT-2 stores its Linear weights
transposed, ``in × out``) — and any module computing ``x @ W + b`` — is pruned, quantized to int8, clustered and
factorized like an ``nn.Linear``; before, pruning reported its target while the 8 block layers kept 0 % zeros.

Real GPT-2 (transformers, tiny random config), real Trainer runs, real ONNX Runtime sessions."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer, tiny_gpt2
from torch import nn

from lightning_compress import (
    MagnitudePruning,
    QATConfig,
    cluster_weights_,
    export_compact,
    export_onnx,
    load_compressed,
    low_rank_,
    onnx_parity,
    prepare_qat,
    prune_,
    save_compressed,
    select_modules,
)
from lightning_compress.core.layout import TRANSPOSED, weight_layout
from lightning_compress.export.onnx import pruned_zeros_kept

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB, TOKENS = 64, 16
BLOCK_LAYERS = [
    f"m.transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return tiny_gpt2(VOCAB, TOKENS)


def ids(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, TOKENS), generator=torch.Generator().manual_seed(seed))


class TinyLM(pl.LightningModule):
    """Next-token prediction on a fixed random sequence set (it can be learned: the loss falls)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = gpt2()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        logits = self(x[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids(64)), batch_size=16)


def zeros(weight: torch.Tensor) -> float:
    return float((weight == 0).float().mean())


def test_conv1d_is_recognised_by_what_it_computes_and_selected_like_a_linear():
    model = gpt2()
    assert all(weight_layout(model.get_submodule(n)) == TRANSPOSED for n in BLOCK_LAYERS)
    assert [n for n, _ in select_modules(model)] == [*BLOCK_LAYERS, "m.lm_head"]
    assert [n for n, _ in select_modules(model, include="@Linear")] == [*BLOCK_LAYERS, "m.lm_head"]

    class MyDense(nn.Module):  # a user's own Linear, not a subclass: y = x @ W + b, W stored (in, out)
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(4))

        def forward(self, x):
            return x @ self.weight + self.bias

    class Scale(nn.Module):  # a 2-D weight that is no Linear: named, never compressed
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x * self.weight.sum(0)

    net = nn.Sequential(MyDense(), Scale(), nn.Linear(4, 2))
    assert [n for n, _ in select_modules(net)] == ["0", "2"]
    with pytest.warns(UserWarning, match=r"does not compress 1 layer.*'1' \(Scale"):
        prune_(net, final_sparsity=0.5, scope="layer")
    assert zeros(net[0].weight) == 0.5


def test_pruning_reaches_every_conv1d_and_names_the_tied_embedding_as_pruned_with_lm_head():
    model = gpt2()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune_(model, final_sparsity=0.5, scope="layer")
    message = " ".join(str(w.message) for w in caught)
    assert "Conv1D" not in message
    assert "'m.transformer.wpe' (Embedding" in message  # not tied: left as it is
    assert "Tied weights: 'm.transformer.wte' (Embedding) with 'm.lm_head'" in message
    for name in [*BLOCK_LAYERS, "m.lm_head"]:
        assert zeros(model.get_submodule(name).weight) == 0.5, name
    assert model.m.transformer.wte.weight is model.m.lm_head.weight  # still tied


def test_n_m_groups_run_along_a_conv1d_s_inputs():
    model = gpt2()
    prune_(model, final_sparsity=0.5, granularity="2:4")
    for name in BLOCK_LAYERS:
        weight = model.get_submodule(name).weight  # (in, out): a group is 4 consecutive inputs of one output
        per_group = (weight.t().reshape(weight.shape[1], -1, 4) != 0).sum(-1)
        assert bool((per_group == 2).all()), name


def test_the_callback_with_a_gradient_criterion_prunes_the_conv1d_layers_it_reports(tmp_path):
    module = TinyLM()
    callback = MagnitudePruning(final_sparsity=0.6, criterion="taylor", scope="layer", start_epoch=0, end_epoch=1)
    make_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(module)
    assert {f"net.{n}" for n in BLOCK_LAYERS} <= set(callback.masks)
    for name in BLOCK_LAYERS:
        assert zeros(module.net.get_submodule(name).weight) == pytest.approx(0.6, abs=1e-3), name
    assert callback.target_reached


def test_qat_quantizes_every_conv1d_and_the_export_holds_them_in_int8(tmp_path):
    model = gpt2()
    prune_(model, final_sparsity=0.5, scope="layer")
    masks = {n: model.get_submodule(n).weight.t() != 0 for n in BLOCK_LAYERS}  # Linear layout, as exported
    layers = prepare_qat(model, QATConfig())
    assert sorted(layers) == sorted([*BLOCK_LAYERS, "m.lm_head"])
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(ids(seed=seed))
    model.eval()
    path = export_onnx(model, tmp_path / "gpt2.int8.onnx", ids(16, seed=5))
    import onnx

    initializers = {i.name: i for i in onnx.load(str(path)).graph.initializer}
    for name in [*BLOCK_LAYERS, "m.lm_head"]:
        assert initializers[f"{name}.weight_quantized"].data_type == onnx.TensorProto.INT8, name
    assert not any(f"{name}.weight" in initializers for name in BLOCK_LAYERS)  # no float copy of a quantized weight
    assert "m.lm_head.weight" in initializers  # the tied embedding's table: read in float, as the warning says
    parity = onnx_parity(model, path, [ids(16, seed=6)])
    assert parity["top1_agreement"] >= 0.995 and parity["samples"] == 16 * TOKENS
    assert pruned_zeros_kept(path, masks) == 1.0

    artifact = tmp_path / "gpt2.lcz"
    save_compressed(model, artifact)
    again = gpt2(seed=3)
    prepare_qat(again, QATConfig())
    load_compressed(artifact, again).eval()
    x = ids(4, seed=7)
    assert torch.equal(again(x), model(x))


def test_clustering_shares_values_in_every_conv1d():
    model = gpt2()
    books = cluster_weights_(model, clusters=8)
    assert set(BLOCK_LAYERS) <= set(books)
    for name in BLOCK_LAYERS:
        assert torch.unique(model.get_submodule(name).weight).numel() <= 8, name


def test_low_rank_factorizes_a_conv1d_into_two_linears_that_compute_the_same():
    model = gpt2().eval()
    ranks = low_rank_(model, ratio=2.0, include=r"mlp\.c_fc")
    assert set(ranks) == {"m.transformer.h.0.mlp.c_fc", "m.transformer.h.1.mlp.c_fc"}
    x = ids()
    compact = export_compact(model, x)  # the ranks the layers carry; no channel trace (GPT-2 cannot be traced)
    layer = compact.get_submodule("m.transformer.h.0.mlp.c_fc")
    assert isinstance(layer, nn.Sequential) and all(isinstance(m, nn.Linear) for m in layer)
    assert layer[0].out_features == ranks["m.transformer.h.0.mlp.c_fc"]
    assert torch.allclose(compact(x), model(x), atol=1e-4)
    assert isinstance(model.get_submodule("m.transformer.h.0.mlp.c_fc"), Conv1D)  # the model itself is unchanged
