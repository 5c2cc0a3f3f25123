"""Every shipped config composes, and every object it describes instantiates."""

import importlib.util
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException

import lightning_compress
from lightning_compress.apps.config import compose, instantiate
from lightning_compress.apps.recipes import available_recipes

CONF = Path(lightning_compress.__file__).parent.parent / "conf"
RECIPES = sorted(p.stem for p in (CONF.parent / "recipes").glob("*.yaml"))
NO_CIFAR = "needs torchvision|no 'cifar-10-batches-py' folder"


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_recipes_are_found():
    assert "digits_prune90" in RECIPES and "dense" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_instantiates(recipe, tmp_path):
    cifar = recipe.startswith("cifar10_")
    cfg = compose([f"recipe={recipe}", f"paths.output_dir={tmp_path}", *([f"data.root={tmp_path}"] if cifar else [])])
    if cifar:  # runs where the user has the files: here the data module says what is missing, the rest builds
        with pytest.raises(Exception, match=NO_CIFAR):
            instantiate(cfg.data)
        input_shape, num_classes = (3, 32, 32), 10
    else:
        dm = instantiate(cfg.data)
        input_shape, num_classes = dm.input_shape, dm.num_classes
    net = instantiate(cfg.model, input_shape=input_shape, num_classes=num_classes)
    instantiate(cfg.module, net=net, num_classes=num_classes)
    for name, c in cfg.compression.items():
        callback = instantiate(c)  # never trains: a teacher given as a config is built when fit starts
        if cifar and name == "distillation":  # its teacher trains on the same missing data first
            with pytest.raises(Exception, match=NO_CIFAR):
                callback.build_teachers()
    for c in cfg.callbacks.values():
        instantiate(c)
    instantiate(cfg.trainer, logger=False)


@pytest.mark.parametrize("model", options("model"))
def test_every_model_instantiates_for_its_data(model, tmp_path):
    import torch

    cfg = compose([f"model={model}", f"paths.output_dir={tmp_path}"])
    shape = (1, 40) if model.endswith("1d") else (1, 8, 8)  # MNIST-1D signals; digits images
    if model == "torchvision" and importlib.util.find_spec("torchvision") is None:
        with pytest.raises(
            InstantiationException, match=r"model=torchvision needs torchvision: pip install '.\[vision\]'"
        ):
            instantiate(cfg.model, input_shape=shape, num_classes=10)
        return  # the refusal names the extra; with torchvision installed the network is built and run below
    net = instantiate(cfg.model, input_shape=shape, num_classes=10)
    assert net(torch.zeros(2, *shape)).shape == (2, 10)


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


@pytest.mark.parametrize("launcher", options("launcher"))
def test_every_launcher_composes(launcher, tmp_path):
    cfg = compose(
        [f"launcher={launcher}", f"paths.output_dir={tmp_path}", "trainer.devices=4", "trainer.num_nodes=2"],
        return_hydra_config=True,
    )
    target = cfg.hydra.launcher._target_
    if launcher == "slurm":  # one SLURM task per device, on every node
        assert target.endswith("SlurmLauncher")
        assert (cfg.hydra.launcher.tasks_per_node, cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.nodes) == (
            4,
            4,
            2,
        )
        assert cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu"
    else:
        assert target.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


def test_sensitivity_config_composes(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("lightning_compress.conf", version_base="1.3"):
        cfg = hydra_compose("sensitivity", overrides=[f"paths.output_dir={tmp_path}"])
    assert cfg.compression == {} and cfg.sensitivity.max_accuracy_drop == 0.01  # a dense model is scanned
    assert list(cfg.sensitivity.sparsities) == [0.5, 0.7, 0.8, 0.9, 0.95, 0.98]


# --------------------------------------------------------------------------- configs that cannot drift
def compression_configs():
    return sorted((CONF / "compression").glob("*.yaml"))


@pytest.mark.parametrize("path", compression_configs(), ids=lambda p: p.stem)
def test_compression_yaml_holds_exactly_its_targets_arguments_and_defaults(path):
    """Every argument of the target is in the YAML with the signature's default (an interpolation such as ${seed}
    or a required ??? stands for the default), and nothing else is."""
    import inspect

    from hydra.utils import get_class
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    target = get_class(raw.pop("_target_"))
    for key in [k for k in raw if k.startswith("_")]:
        raw.pop(key)
    params = {n: p for n, p in inspect.signature(target).parameters.items() if n != "self"}
    assert set(raw) == set(params), f"{path.name}: YAML keys differ from {target.__name__}'s arguments"
    for name, value in raw.items():
        default = params[name].default
        if value == "???":
            assert default is inspect.Parameter.empty, f"{path.name}: `{name}` is required in YAML only"
        elif isinstance(value, str) and value.startswith("${"):
            assert default is not inspect.Parameter.empty
        else:
            assert value == default, f"{path.name}: `{name}` is {value!r} in YAML, {default!r} in the signature"


def test_the_parity_threshold_has_one_home(tmp_path):
    from lightning_compress.export.onnx import PARITY_GOAL

    assert "0.995" not in (CONF / "config.yaml").read_text()
    assert compose([f"paths.output_dir={tmp_path}"]).onnx_parity_min_agreement == PARITY_GOAL


def test_recipes_are_real_files_in_one_top_level_folder():
    folder = CONF.parent / "recipes"
    assert folder.is_dir() and not folder.is_symlink() and len(RECIPES) > 5
    assert not any(p.is_symlink() for p in [*CONF.rglob("*"), *folder.rglob("*")])
    assert not (CONF / "recipe").exists()  # the only copy
    assert available_recipes() == RECIPES  # what the app and load_recipe offer is that folder


def test_recipe_group_lists_and_refuses_like_any_hydra_group():
    with pytest.raises(MissingConfigException, match="digits_prune90") as refused:  # Hydra lists the options
        compose(["recipe=no_such_recipe", "paths.output_dir=/tmp/x"])
    assert "no_such_recipe" in str(refused.value)
    assert compose(["recipe=digits_qat_int8", "paths.output_dir=/tmp/x"]).compression.quantization
