"""Where the shipped Hydra configs live, and composing them without running the app."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lightning_compress.export.onnx import PARITY_GOAL
from lightning_compress.instantiate import instantiate

#: Hydra search-path entry of the shipped configs (conf/ and recipes/ of the repository, inside the wheel).
CONFIG_SEARCHPATH = "pkg://lightning_compress.conf"
CONFIG_NAME = "config"

__all__ = ["CONFIG_NAME", "CONFIG_SEARCHPATH", "CONSTANTS", "compose", "instantiate"]


def register_recipes() -> None:
    """Make ``recipe=<name>`` find ``recipes/<name>.yaml``: register the recipes' config source and search-path plugin
    (``hydra_plugins.lightning_compress_recipes``) with Hydra. Hydra finds them by itself in an installed wheel; an
    editable install hides ``hydra_plugins`` subpackages from Hydra's scan, so the apps register them (once)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.lightning_compress_recipes import RecipesConfigSource, RecipesSearchPath

    for plugin in (RecipesConfigSource, RecipesSearchPath):
        Plugins.instance().register(plugin)


register_recipes()

#: Constants the configs read from the code (``${lightning_compress:<name>}``), so that each has one home.
CONSTANTS = {"parity_goal": PARITY_GOAL}
if not OmegaConf.has_resolver("lightning_compress"):
    OmegaConf.register_new_resolver("lightning_compress", lambda name: CONSTANTS[name])


def stages_dir() -> str | None:
    """``${lightning_compress.stages_dir:}``: ``<sweep dir>/stages`` in a multirun (every trial and every rerun of
    the sweep share it), ``None`` in a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return str(Path(HydraConfig.get().sweep.dir) / "stages")


if not OmegaConf.has_resolver("lightning_compress.stages_dir"):
    OmegaConf.register_new_resolver("lightning_compress.stages_dir", stages_dir)


def compose(
    overrides: Sequence[str] = (), return_hydra_config: bool = False, config_name: str = CONFIG_NAME
) -> DictConfig:
    """Compose the app's configuration without running it (as tests and notebooks do).

    Pass ``paths.output_dir=...``: outside a running app Hydra has no run directory. ``config_name="sensitivity"``
    composes the sensitivity app's configuration instead.

    Example:
        >>> cfg = compose(["recipe=dense", "paths.output_dir=/tmp/x"])
        >>> cfg.trainer.max_epochs
        30
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_module("lightning_compress.conf", version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
    # ${hydra:...} interpolations (task_name, the run directory) resolve as they do inside the app.
    HydraConfig.instance().set_config(cfg)
    if not return_hydra_config:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg
