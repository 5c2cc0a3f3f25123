"""The one helper every config object of the package is built through (``_target_`` configs).

It lives below the apps because a technique may take a config too (a distillation teacher given as
``{_target_: ...}``, built when training starts); keeping every ``instantiate`` here gives an allow-list of targets
(Hydra 1.4) a single home.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def instantiate(cfg: Mapping[str, Any], **kwargs: Any) -> Any:
    """Build the object a config describes (``_target_``), with ``kwargs`` added to its arguments. Hydra is imported
    here, on first use, so that ``import lightning_compress`` does not load it."""
    from hydra.utils import instantiate as hydra_instantiate

    return hydra_instantiate(cfg, **kwargs)


def plain(cfg: Any) -> Any:
    """A config as plain Python containers with every interpolation resolved (configs given as ``DictConfig`` by
    Hydra, or already plain); used to key cached stages by their settings."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return {k: plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [plain(v) for v in cfg]
    return cfg
