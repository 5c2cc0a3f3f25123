"""load_recipe: the compression part of a recipe, as callbacks for a user's own Trainer.

The CLI's ``recipe=<name>`` and :func:`load_recipe` read the same files (``recipes/`` of the repository, shipped as
the config group ``recipe`` of ``lightning_compress.conf``), composed by Hydra in the same way.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from lightning.pytorch import Callback

from lightning_compress.config import compose, instantiate


def available_recipes() -> list[str]:
    """Names of the shipped recipes."""
    folder = resources.files("lightning_compress.conf") / "recipe"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(
    name_or_path: str | os.PathLike,
    overrides: Sequence[str] = (),
    output_dir: str | os.PathLike | None = None,
) -> list[Callback]:
    """Instantiate the compression callbacks of a recipe (in the order the recipe lists them).

    Args:
        name_or_path: A shipped recipe's name (see :func:`available_recipes`) or the path of a recipe YAML file
            (``# @package _global_``, like the shipped ones).
        overrides: Hydra overrides applied on top, e.g. ``["compression.pruning.final_sparsity=0.95"]``.
        output_dir: Where a recipe may write (``${paths.output_dir}``, e.g. a distillation teacher's checkpoint);
            a temporary folder by default.

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
        (folder / "recipe" / f"{path.stem}.yaml").symlink_to(path)
        search, name = [f"hydra.searchpath=[file://{folder}]"], path.stem
    else:
        name = text
        if name not in available_recipes():
            raise ValueError(f"load_recipe: unknown recipe {name!r}. Available: {', '.join(available_recipes())}.")
    out = os.fspath(output_dir) if output_dir is not None else tempfile.mkdtemp(prefix="lightning-compress-")
    cfg = compose([*search, f"recipe={name}", f"paths.output_dir={out}", *overrides])
    return [instantiate(c) for c in (cfg.get("compression") or {}).values() if c]
