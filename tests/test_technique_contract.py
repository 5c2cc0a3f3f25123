"""One shape per technique: a validated config, a verb on any nn.Module, a callback that only decides *when* — and the
same bad input refused the same way by all three."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_trainer, small_module
from torch import nn

import lightning_compress as lc
from lightning_compress import (
    ClusteringConfig,
    ConfigError,
    DistillationConfig,
    KnowledgeDistillation,
    LowRankConfig,
    LowRankFactorization,
    MagnitudePruning,
    PruningConfig,
    QATConfig,
    QuantizationAwareTraining,
    WeightClustering,
    cluster_weights_,
    distillation_loss,
    export_compact,
    low_rank_,
    prepare_qat,
    prune_,
)
from lightning_compress.core import checks, clustering, configs, lowrank
from lightning_compress.tasks import DigitsDataModule, ResNet20

CONF = Path(__file__).resolve().parents[1] / "conf" / "compression"


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _verb_distill(**bad):
    return distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, bad)


# technique → (config, callback factory, verb); each bad input must be refused by all three with one message.
FORMS = {
    "pruning": (PruningConfig, MagnitudePruning, lambda **bad: prune_(mlp(), **bad)),
    "low_rank": (LowRankConfig, LowRankFactorization, lambda **bad: low_rank_(mlp(), **bad)),
    "clustering": (ClusteringConfig, WeightClustering, lambda **bad: cluster_weights_(mlp(), **bad)),
    "qat": (QATConfig, QuantizationAwareTraining, lambda **bad: prepare_qat(mlp(), **bad)),
    "distillation": (DistillationConfig, lambda **bad: KnowledgeDistillation(nn.Linear(3, 3), **bad), _verb_distill),
}

BAD = [
    ("pruning", {"final_sparsity": 1.5}, r"`final_sparsity` must be in \[0, 1\), got 1.5"),
    ("pruning", {"final_sparsity": -0.3}, r"`final_sparsity` must be in \[0, 1\), got -0.3"),
    ("pruning", {"final_sparsity": "0.5"}, r"`final_sparsity` must be a number"),
    ("pruning", {"granularity": "2:4", "final_sparsity": 0.5, "scope": "global"}, r"N:M patterns are per layer"),
    ("pruning", {"granularity": "2:4", "final_sparsity": 0.75}, r"\[0, 0.5\] for granularity '2:4'"),
    ("pruning", {"granularity": "4:2"}, r"`granularity` must be 'unstructured', 'channel' or 'N:M'"),
    ("pruning", {"criterion": "biggest"}, r"`criterion` must be one of \('magnitude', 'random'"),
    ("pruning", {"scope": "model"}, r"`scope` must be one of \('global', 'layer'\)"),
    ("pruning", {"threshold": 0.1}, r"only used with criterion='threshold'"),
    ("pruning", {"criterion": "threshold"}, r"criterion='threshold' needs a finite `threshold` > 0"),
    ("pruning", {"round_to": 8}, r"`round_to` rounds the channels each group keeps"),
    ("pruning", {"layer_sparsity": {"0": 1.0}}, r"`layer_sparsity\['0'\]` must be in \[0, 1\)"),
    ("pruning", {"include": "("}, r"`include` pattern '\(' is not a valid regular expression"),
    ("pruning", {"exclude": 3}, r"`exclude` must be a regular expression, an @selector or a list"),
    ("pruning", {"seed": 0.5}, r"`seed` must be an integer"),
    ("low_rank", {"ratio": 1}, r"`ratio` must be a finite number > 1"),
    ("low_rank", {"ratio": "4"}, r"`ratio` must be a finite number > 1, got '4'"),
    ("low_rank", {"budget": "bytes"}, r"`budget` must be one of \('params', 'flops'\)"),
    ("low_rank", {"layer_rank": {"0": 0}}, r"`layer_rank\['0'\]` must be an integer >= 1"),
    ("clustering", {"clusters": 1}, r"`clusters` must be an integer >= 2"),
    ("clustering", {"clusters": 2.5}, r"`clusters` must be an integer >= 2"),
    ("clustering", {"init": "random"}, r"`init` must be one of \('linear', 'kmeans\+\+'\)"),
    ("clustering", {"layer_clusters": {"0": 1}}, r"`layer_clusters\['0'\]` must be an integer >= 2"),
    ("qat", {"weight_bits": 9}, r"`weight_bits` must be an integer from 2 to 8"),
    ("qat", {"observer": "max"}, r"`observer` must be one of \('minmax', 'lsq'\)"),
    ("qat", {"activation_bits": 1}, r"`activation_bits`=1 is the binary quantizer"),
    ("qat", {"averaging_constant": 0}, r"`averaging_constant` must be in \(0, 1\]"),
    ("qat", {"per_channel": "yes"}, r"`per_channel` must be True or False"),
    ("qat", {"layer_bits": [8]}, r"`layer_bits` must be a mapping"),
    ("distillation", {"temperature": 0}, r"`temperature` must be a finite number > 0"),
    ("distillation", {"alpha": 2}, r"`alpha` must be in \[0, 1\], got 2"),
    ("distillation", {"feature_weight": -1}, r"`feature_weight` must be a finite number >= 0"),
]


@pytest.mark.parametrize(("technique", "bad", "message"), BAD, ids=[f"{t}-{b}" for t, b, _ in BAD])
def test_config_verb_and_callback_refuse_the_same_input_with_one_message(technique, bad, message):
    config, callback, verb = FORMS[technique]
    messages = []
    for form in (config, callback, verb):
        with pytest.raises(ValueError, match=message) as err:
            form(**bad)
        messages.append(str(err.value))
    assert messages[0] == messages[1] == messages[2]


@pytest.mark.parametrize("technique", sorted(FORMS))
def test_an_unknown_field_is_named_with_the_fields_there_are(technique):
    config, _, verb = FORMS[technique]
    first = configs.fields_of(config)[0]
    typo = first[:-1]
    with pytest.raises(ConfigError, match=rf"{config.__name__} has no field '{typo}' \(did you mean '{first}'\?\)"):
        config(**{typo: 1})
    with pytest.raises(ConfigError, match=rf"its fields are: {first}, "):
        config.from_dict({typo: 1})
    with pytest.raises(ConfigError, match=rf"has no field '{typo}'"):
        verb(**{typo: 1})


YAML_OF = {
    PruningConfig: "magnitude_pruning.yaml",
    LowRankConfig: "low_rank_factorization.yaml",
    ClusteringConfig: "weight_clustering.yaml",
    QATConfig: "quantization_aware_training.yaml",
    DistillationConfig: "knowledge_distillation.yaml",
}


@pytest.mark.parametrize("config", list(YAML_OF), ids=lambda c: c.__name__)
def test_configs_read_and_write_their_hydra_yaml(config):
    """A config's fields are the callback YAML's keys of the same name with the same defaults: the YAML's values build
    the default config, and to_dict / from_dict round-trip."""
    data = yaml.safe_load((CONF / YAML_OF[config]).read_text())
    names = configs.fields_of(config)
    assert set(names) <= set(data), f"{YAML_OF[config]} lacks {set(names) - set(data)}"
    values = {n: data[n] for n in names if not (isinstance(data[n], str) and data[n].startswith("${"))}
    built = config.from_dict(values)
    assert built == config()
    assert config.from_dict(built.to_dict()) == built
    assert yaml.safe_load(yaml.safe_dump(built.to_dict())) == built.to_dict()  # plain values only


def test_choices_are_literals_that_match_the_checked_values():
    pairs = [
        (configs.ScopeName, checks.Scope),
        (configs.CriterionName, checks.Criterion),
        (configs.ObserverName, checks.Observer),
        (configs.BudgetName, lowrank.Budget),
        (configs.ClusterInitName, clustering.ClusterInit),
        (configs.ScheduleName, checks.Schedule),
    ]
    for literal, enum in pairs:
        assert typing.get_args(literal) == enum.values()
    hints = typing.get_type_hints(MagnitudePruning.__init__)
    assert typing.get_args(hints["criterion"]) == checks.Criterion.values()


def test_the_callback_holds_the_config_it_checked():
    cb = MagnitudePruning(final_sparsity=0.5, granularity="2:4", include="0")
    assert cb.config == PruningConfig(final_sparsity=0.5, granularity="2:4", include="0")
    assert cb.config.scope == "layer"
    assert LowRankFactorization(ratio=3).config == LowRankConfig(ratio=3)
    assert WeightClustering(clusters=8).config == ClusteringConfig(clusters=8)
    assert QuantizationAwareTraining(weight_bits=4).config == QATConfig(weight_bits=4)


# --------------------------------------------------------------------------- prune_ as the callback prunes
def test_prune_takes_the_config_and_its_old_positional_form():
    a, b = mlp(), mlp()
    b.load_state_dict(a.state_dict())
    masks_a = prune_(a, PruningConfig(final_sparsity=0.5, layer_sparsity={"^2$": 0.25}))
    masks_b = prune_(b, 0.5, layer_sparsity={"^2$": 0.25})
    assert all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a)
    assert float((~masks_a["2"]).float().mean()) == 0.25  # its own target, ranked on its own
    nm = prune_(mlp(), PruningConfig(final_sparsity=0.5, granularity="2:4"))
    assert all(int(m.reshape(-1, 4).sum(1).max()) == 2 for m in nm.values())


def test_prune_refuses_what_it_cannot_do_once():
    with pytest.raises(ValueError, match=r"prune_ prunes once and sees no gradients.*MagnitudePruning\(criterion="):
        prune_(mlp(), 0.5, criterion="taylor")
    with pytest.raises(ValueError, match=r"granularity='2:4' cannot prune 1 layer\(s\) .*'0'"):
        prune_(nn.Sequential(nn.Linear(6, 4)), 0.5, granularity="2:4")
    with pytest.raises(ValueError, match=r"granularity='channel' traces the model on one input.*`example_input`"):
        prune_(mlp(), 0.5, granularity="channel")


def test_prune_with_channel_groups_gives_what_export_compact_cuts():
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = ResNet20((1, 8, 8), 10, width=8).eval()
    x = torch.randn(4, 1, 8, 8)
    masks = prune_(model, PruningConfig(final_sparsity=0.5, granularity="channel"), example_input=x)
    assert masks and all(m.dtype == torch.bool for m in masks.values())
    assert all(torch.equal(model.get_submodule(n).weight == 0, ~m) or not (~m).any() for n, m in masks.items())
    compact = export_compact(model, x)  # refused the per-layer rows prune_ made before
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in compact.parameters()) < 0.6 * before
    assert torch.allclose(compact(x), model(x), atol=1e-5)


def test_prune_prunes_a_tied_weight_once():
    net = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    net[1].weight = net[0].weight
    masks = prune_(net, 0.5)
    assert list(masks) == ["0"]
    assert int((net[0].weight == 0).sum()) == 32


# --------------------------------------------------------------------------- distillation as the callback computes it
def test_distillation_loss_is_the_callbacks_loss():
    torch.manual_seed(0)
    s, t1, t2 = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4)
    task = torch.tensor(2.0)
    config = DistillationConfig(temperature=2.0, alpha=0.3)
    both = distillation_loss(s, [t1, t2], task, config, teacher_weights=[3, 1])
    kd = lc.distillation.kd_loss
    expected = 0.7 * task + 0.3 * (0.75 * kd(s, t1, 2.0) + 0.25 * kd(s, t2, 2.0))
    assert torch.allclose(both, expected)
    assert torch.equal(distillation_loss(s, t1, None, config), kd(s, t1, 2.0))
    with pytest.raises(ValueError, match=r"`teacher_weights` must hold 2 non-negative numbers"):
        distillation_loss(s, [t1, t2], task, config, teacher_weights=[1])


# --------------------------------------------------------------------------- one entry per structure-changing instance
@pytest.mark.parametrize("order", ["short_first", "long_first"])
def test_qat_starts_after_the_later_of_two_pruning_ramps(tmp_path, order):
    short = MagnitudePruning(final_sparsity=0.5, end_epoch=1, include=r"features")
    long = MagnitudePruning(final_sparsity=0.5, end_epoch=2, include=r"classifier")
    qat = QuantizationAwareTraining(calibration_steps=0)
    pruners = [short, long] if order == "short_first" else [long, short]
    trainer = make_trainer(tmp_path, callbacks=[*pruners, qat], max_epochs=3)
    trainer.fit(small_module(), DigitsDataModule(seed=0))
    assert qat._steps["start"] == long._end_step == 2 * short._end_step > 0


# --------------------------------------------------------------------------- the package's surface
def test_import_loads_no_hydra_and_every_raised_exception_is_exported():
    code = (
        "import sys, time; import lightning.pytorch; before = set(sys.modules); t = time.perf_counter(); "
        "import lightning_compress; print(time.perf_counter() - t); "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert eval(out[1]) == ["lightning_compress"], out  # no hydra, omegaconf, wandb, rich, sklearn of its own
    assert callable(lc.load_recipe) and "digits_prune90" in lc.available_recipes()  # loaded on first use
    package = Path(lc.__file__).parent
    raised = set()
    for path in package.rglob("*.py"):
        for line in path.read_text().splitlines():
            if line.strip().startswith("raise ") and "Error(" in line:
                raised.add(line.strip().split()[1].split("(")[0])
    own = {name for name in raised if name not in dir(__import__("builtins"))}
    assert own and own <= set(lc.__all__), own - set(lc.__all__)


# --------------------------------------------------------------------------- the model carries what was done to it
def test_export_compact_factorizes_the_ranks_the_layers_carry(tmp_path):
    from conftest import small_module

    module = small_module(width=8, hidden=64)
    low_rank = LowRankFactorization(ratio=4, include=r"classifier\.1$", end_epoch=1)
    make_trainer(tmp_path, callbacks=[low_rank], max_epochs=1).fit(module, DigitsDataModule(seed=0))
    x = torch.randn(8, 1, 8, 8)
    dense = sum(p.numel() for p in module.parameters())
    compact = export_compact(module, x)  # no ranks=: before, the same parameters came back without a word
    assert sum(p.numel() for p in compact.parameters()) < dense
    explicit = export_compact(module, x, ranks=low_rank.ranks)
    assert sum(p.numel() for p in explicit.parameters()) == sum(p.numel() for p in compact.parameters())
    assert sum(p.numel() for p in export_compact(module, x, ranks={}).parameters()) == dense  # an argument overrides

    net = mlp()
    ranks = low_rank_(net, LowRankConfig(ratio=3))
    assert ranks and lc.core.lowrank.recorded_ranks(net) == ranks
    assert sum(p.numel() for p in export_compact(net, torch.randn(4, 16)).parameters()) < sum(
        p.numel() for p in net.parameters()
    )
