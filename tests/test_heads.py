"""Channel pruning removes whole attention heads — each head's rows of the query, key and value projections and its
columns of the output projection — and the compact export cuts them, updating the attention module's head count and
proving the smaller network equal. Attention modules whose heads cannot be found are named, their projections dense."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_trainer
from torch import nn

from lightning_compress import MagnitudePruning, export_compact, prune_
from lightning_compress.pruning.groups import channel_groups
from lightning_compress.tasks import ClassificationModule, DigitsDataModule, PixelTransformer
from lightning_compress.tasks.models import SelfAttention

pytest.importorskip("torch_pruning")


def removed_heads(attention: SelfAttention) -> list[int]:
    rows = attention.q.weight.reshape(attention.heads, -1).abs().sum(1)
    return [h for h in range(attention.heads) if rows[h] == 0]


def test_channel_pruning_removes_whole_heads_in_a_trainer_and_the_compact_export_cuts_them(tmp_path):
    torch.manual_seed(0)
    module = ClassificationModule(PixelTransformer(dim=32, depth=2, heads=4))
    pruning = MagnitudePruning(final_sparsity=0.5, granularity="channel", scope="layer", end_epoch=1)
    make_trainer(tmp_path, max_epochs=2, callbacks=[pruning]).fit(module, DigitsDataModule())
    heads = [g for g in pruning.groups if g.host is not None]
    assert [g.host for g in heads] == ["net.blocks.0.attention", "net.blocks.1.attention"]
    for block in module.net.blocks:
        attention = block.attention
        gone = removed_heads(attention)
        assert len(gone) == 2  # half of the 4 heads, whole: q, k, v rows and o columns together
        for h in gone:
            rows = slice(h * attention.head_dim, (h + 1) * attention.head_dim)
            for projection in (attention.q, attention.k, attention.v):
                assert not projection.weight[rows].any() and not projection.bias[rows].any()
            assert not attention.o.weight[:, rows].any()
    x = torch.rand(16, 1, 8, 8)
    compact = export_compact(module, x)
    assert compact.max_abs_difference <= 1e-5
    for block in compact.net.blocks:
        attention = block.attention
        assert attention.heads == 2 and attention.q.out_features == attention.o.in_features == 16


def test_heads_and_mlp_neurons_rank_together_in_one_global_ranking():
    torch.manual_seed(0)
    net = PixelTransformer(dim=32, depth=1, heads=4).eval()
    x = torch.rand(8, 1, 8, 8)
    groups = channel_groups(net, x)
    kinds = {(g.root, g.channels) for g in groups}
    assert ("blocks.0.attention.q", 4) in kinds and ("blocks.0.mlp.0", 128) in kinds
    prune_(net, final_sparsity=0.5, granularity="channel", example_input=x)
    compact = export_compact(net, x)
    assert compact.max_abs_difference <= 1e-5


def test_attention_whose_heads_cannot_be_found_is_named_and_left_dense():
    class Fused(nn.Module):  # one projection for q, k and v together (GPT-2's c_attn, timm's qkv)
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            return self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    class FusedAttention(Fused):
        pass

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 16)
            self.attention = FusedAttention()
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            h = self.embed(x)
            h = h + self.attention(h)
            h = h + self.mha(h, h, h, need_weights=False)[0]
            return self.head(self.mlp(h).mean(1))

    net = Net().eval()
    x = torch.randn(2, 5, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = channel_groups(net, x)
    message = " ".join(str(w.message) for w in caught)
    assert "2 attention module(s) keep all their heads" in message
    assert "'attention' (no three q/k/v projections reading one input: fused or unrecognised)" in message
    assert "'mha' (nn.MultiheadAttention: its kernel reads the q/k/v weights itself)" in message
    roots = [g.root for g in groups]
    assert "mlp.0" in roots and not [r for r in roots if r.startswith(("attention", "mha"))]  # the MLP's neurons stay


def test_grouped_query_attention_keeps_its_heads_named():
    transformers = pytest.importorskip("transformers")
    from conftest import Logits

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)  # fmt: skip
    torch.manual_seed(0)
    model = Logits(transformers.LlamaForCausalLM(config)).eval()
    ids = torch.randint(0, 64, (2, 16))
    with pytest.warns(UserWarning, match=r"'m.model.layers.0.self_attn' \(grouped-query attention"):
        prune_(model, final_sparsity=0.5, granularity="channel", example_input=ids)
    assert export_compact(model, ids).max_abs_difference <= 1e-5
