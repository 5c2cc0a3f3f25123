"""load_recipe: the compression part of a recipe, as callbacks for a user's own Trainer.

The CLI's ``recipe=<name>`` and :func:`load_recipe` read the same files (``recipes/`` of the repository, shipped
as ``lightning_compress.recipes``: the config group ``recipe`` of the app), composed by Hydra in the same way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from omegaconf import DictConfig

from hydra_plugins.lightning_compress_recipes import recipe_names
from lightning_compress.apps.config import compose, instantiate


def available_recipes() -> list[str]:
    """Names of the shipped recipes."""
    return recipe_names("lightning_compress.recipes")


def as_shares_of_training(node: DictConfig, max_epochs: Any) -> DictConfig:
    """A callback config whose points of training (``*_epoch`` arguments given in epochs) are rewritten as shares of
    a run of ``max_epochs`` epochs (``"66.66…%"``), so that they follow the length of the Trainer they are used in.

    Example:
        >>> from omegaconf import OmegaConf
        >>> node = OmegaConf.create({"_target_": "x", "start_epoch": 0, "end_epoch": 15, "freeze_bn_epoch": None})
        >>> dict(as_shares_of_training(node, 30))
        {'_target_': 'x', 'start_epoch': '0%', 'end_epoch': '50%', 'freeze_bn_epoch': None}
    """
    out = node.copy()
    if not isinstance(max_epochs, int) or isinstance(max_epochs, bool) or max_epochs <= 0:
        return out
    for key in [k for k in out if str(k).endswith("_epoch")]:
        value = out[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            share = 100 * value / max_epochs
            out[key] = f"{share:g}%" if float(share).is_integer() else f"{share!r}%"
    return out


def load_recipe(
    name_or_path: str | os.PathLike,
    overrides: Sequence[str] = (),
    output_dir: str | os.PathLike | None = None,
    follow_trainer_length: bool = True,
) -> list[Callback]:
    """Instantiate the compression callbacks of a recipe (in the order the recipe lists them).

    Nothing is trained or loaded here: a distillation teacher given as a config is built when ``fit`` starts.

    Portable: the recipe's schedule follows the length of the Trainer it is used in. A recipe is written for its
    own ``trainer.max_epochs`` (30 for the digits recipes); with ``follow_trainer_length`` every point of training
    it gives in epochs (``start_epoch``, ``end_epoch``, ``freeze_bn_epoch``, ...) becomes that share of the user's
    ``max_epochs`` (a ramp that ends at epoch 20 of 30 ends at two thirds of any run). Per-layer choices in the
    shipped recipes use selectors that mean the same on any model (``@first``, ``@last``).

    Args:
        name_or_path: A shipped recipe's name (see :func:`available_recipes`) or the path of a recipe YAML file
            (``# @package _global_``, like the shipped ones).
        overrides: Hydra overrides applied on top, e.g. ``["compression.pruning.final_sparsity=0.95"]``.
        output_dir: Where a recipe may write (``${paths.output_dir}``, e.g. a distillation teacher's checkpoint);
            a temporary folder by default.
        follow_trainer_length: Rewrite the recipe's epochs as shares of its own ``trainer.max_epochs`` (default);
            ``False`` keeps them as absolute epochs.

    Raises:
        ValueError: An unknown recipe name (the message lists the available ones) or a missing file.

    Example::

        trainer = pl.Trainer(max_epochs=30, callbacks=load_recipe("digits_prune90"))
    """
    text = os.fspath(name_or_path)
    search: list[str] = []
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(text).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"load_recipe: no recipe file at {str(path)!r}.")
        # A file outside the package joins the search path as the recipe group of a folder of its own.
        folder = Path(tempfile.mkdtemp(prefix="lightning-compress-recipe-"))
        (folder / "recipe").mkdir()
        shutil.copyfile(path, folder / "recipe" / f"{path.stem}.yaml")
        search, name = [f"hydra.searchpath=[file://{folder}]"], path.stem
    else:
        name = text
        if name not in available_recipes():
            raise ValueError(f"load_recipe: unknown recipe {name!r}. Available: {', '.join(available_recipes())}.")
    out = os.fspath(output_dir) if output_dir is not None else tempfile.mkdtemp(prefix="lightning-compress-")
    cfg = compose([*search, f"recipe={name}", f"paths.output_dir={out}", *overrides])
    nodes = [c for c in (cfg.get("compression") or {}).values() if c]
    if follow_trainer_length:
        nodes = [as_shares_of_training(c, cfg.trainer.get("max_epochs")) for c in nodes]
    return [instantiate(c) for c in nodes]
