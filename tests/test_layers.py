"""The layer contract: imports point down only — core ← adapters ← analysis ← apps — function-level imports included.

Every module of the package belongs to exactly one layer (a new file outside every layer fails here, so that it is
placed on purpose). ``tasks`` is one *user* of the library beside the apps: nothing in the library imports it. The
core imports no Lightning, Hydra, rich or W&B; analysis no Hydra or rich.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "lightning_compress"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

#: Layer of a module, by the longest matching prefix of its dotted name below the package.
LAYERS = {
    "core": 0,
    "pruning": 1, "quantization": 1, "distillation": 1, "lowrank": 1, "clustering": 1, "export": 1, "trainer": 1,
    "instantiate": 1,
    "analysis": 2,
    "apps": 3,
    "tasks": 4,
    "": 5,  # lightning_compress/__init__.py: the public API re-exports every layer
    "conf": 5,
}  # fmt: skip
NAMES = {0: "core", 1: "adapters", 2: "analysis", 3: "apps", 4: "tasks", 5: "public API"}
#: Third-party packages a layer must not import (the core is pure; analysis is usable from a notebook).
FORBIDDEN = {
    0: ("lightning", "pytorch_lightning", "hydra", "omegaconf", "rich", "wandb"),
    2: ("hydra", "omegaconf", "rich"),
}


def layer_of(module: str) -> int | None:
    parts = module.split(".")[1:] if module.startswith(PACKAGE) else None
    if parts is None:
        return None
    head = parts[0] if parts and parts[0] != "__init__" else ""
    return LAYERS.get(head)


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth (functions, methods, branches)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from lightning_compress import x` may name a submodule: count it as that submodule.
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names if target == PACKAGE]
    return found


def violations(root: Path) -> list[str]:
    """Every import that points up a layer, reaches tasks from the library, or brings a forbidden package in."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        own = layer_of(module)
        if own is None:
            problems.append(f"{path.relative_to(root.parent)}: belongs to no layer (add it to a layer's folder)")
            continue
        for line, target in imports_of(path, module):
            where = f"{path.relative_to(root.parent)}:{line}"
            top = target.split(".")[0]
            if top == PACKAGE:
                if target == PACKAGE and own < 5:
                    problems.append(f"{where}: {NAMES[own]} imports the public API {PACKAGE!r} (import the module)")
                    continue
                other = layer_of(target)
                if other is None or target == PACKAGE:
                    continue
                if other == 4 and own < 4:
                    problems.append(f"{where}: {NAMES[own]} imports {target} (tasks are a user of the library)")
                elif other > own and other != 4:
                    problems.append(f"{where}: {NAMES[own]} imports {target} from {NAMES[other]} (upward)")
            elif top in FORBIDDEN.get(own, ()):
                problems.append(f"{where}: {NAMES[own]} imports {top}")
    return problems


def test_the_package_imports_down_only():
    assert violations(ROOT) == []


def test_the_contract_catches_an_upward_import_inside_a_function(tmp_path):
    pkg = tmp_path / PACKAGE
    for folder in ("core", "apps"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "apps" / "train.py").write_text("def main():\n    pass\n")
    (pkg / "core" / "masks.py").write_text(
        "import torch\n\ndef f():\n    from lightning_compress.apps.train import main\n    return main\n"
    )
    (pkg / "core" / "quiet.py").write_text("from ..apps import train\nimport lightning.pytorch\n")
    (pkg / "stray.py").write_text("")
    found = violations(pkg)
    assert any("core/masks.py:4: core imports lightning_compress.apps.train from apps (upward)" in p for p in found)
    assert any("core/quiet.py:1: core imports lightning_compress.apps from apps (upward)" in p for p in found)
    assert any("core/quiet.py:2: core imports lightning" in p for p in found)
    assert any("stray.py: belongs to no layer" in p for p in found)


@pytest.mark.parametrize("module", ["lightning_compress.core.masks", "lightning_compress.analysis.report"])
def test_layer_of_known_modules(module):
    assert layer_of(module) is not None
