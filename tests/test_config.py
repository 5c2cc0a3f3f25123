"""Every shipped config composes, and every object it describes instantiates."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

import lightning_compress
from lightning_compress.config import compose, instantiate

CONF = Path(lightning_compress.__file__).parent.parent / "conf"
RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_recipes_are_found():
    assert "digits_prune90" in RECIPES and "dense" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_instantiates(recipe, tmp_path):
    cfg = compose([f"recipe={recipe}", f"paths.output_dir={tmp_path}"])
    dm = instantiate(cfg.data)
    net = instantiate(cfg.model, input_shape=dm.input_shape, num_classes=dm.num_classes)
    instantiate(cfg.module, net=net, num_classes=dm.num_classes)
    for c in cfg.compression.values():
        instantiate(c)
    for c in cfg.callbacks.values():
        instantiate(c)
    instantiate(cfg.trainer, logger=False)


@pytest.mark.parametrize("model", options("model"))
def test_every_model_instantiates_for_digits(model, tmp_path):
    import torch

    cfg = compose([f"model={model}", f"paths.output_dir={tmp_path}"])
    net = instantiate(cfg.model, input_shape=(1, 8, 8), num_classes=10)
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("logger", options("logger"))
def test_every_logger(logger, tmp_path):
    cfg = compose([f"logger={logger}", f"paths.output_dir={tmp_path}"])
    if logger == "none":
        assert not cfg.logger
    else:
        instantiate(cfg.logger)


@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_trainer(trainer, tmp_path):
    cfg = compose([f"trainer={trainer}", f"paths.output_dir={tmp_path}", "trainer.accelerator=cpu"])
    instantiate(cfg.trainer, logger=False)


@pytest.mark.parametrize(
    ("data", "message"), [("cifar10", "cifar-10-batches-py"), ("image_folder", "has no 'train/' folder")]
)
def test_data_without_files_says_so(data, message, tmp_path):
    import importlib.util

    cfg = compose([f"data={data}", f"data.root={tmp_path}", f"paths.output_dir={tmp_path}"])
    expected = (
        (FileNotFoundError, message) if importlib.util.find_spec("torchvision") else (ImportError, "needs torchvision")
    )
    with pytest.raises(Exception) as info:
        instantiate(cfg.data)
    assert isinstance(info.value.__cause__ or info.value, expected[0]) or expected[1] in str(info.value)
    assert expected[1] in str(info.value)


def test_unknown_recipe_and_misspelled_key(tmp_path):
    with pytest.raises(MissingConfigException, match="recipe/nope"):
        compose(["recipe=nope"])
    with pytest.raises(ConfigCompositionException, match="final_sparsty"):
        compose(["compression.pruning.final_sparsty=0.5"])
