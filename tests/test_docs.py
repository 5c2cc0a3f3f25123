"""The documentation: every code block runs (or says why it cannot), and the site builds with ``--strict``.

How a page's code blocks are checked (docs/development.md says the same for writers):

- ``python`` blocks run in order in one namespace per page, in a temporary working directory, after the page's
  hidden set-up (an HTML comment ``<!-- setup`` … ``-->``, invisible on the site), so a block may use what an earlier
  block of the page made;
- ``bash`` blocks of ``lightning-compress`` / ``lightning-compress-sensitivity`` commands are composed: each command's
  overrides (the first value of a sweep) must compose and resolve to the app's configuration, and its schedules must
  end within its ``trainer.max_epochs`` — a renamed setting or recipe, or a shortened run that the app would refuse,
  fails here; the commands themselves train for minutes and run end to end in ``tests/test_cli.py``;
- ``yaml`` blocks must parse; ``text`` blocks are output and diagrams, not code;
- any other block is preceded by ``<!-- not-run: <reason> -->``, and the reason must be given.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(ROOT).as_posix() for p in DOCS.rglob("*.md")) + ["README.md"]
BLOCK = re.compile(
    r"(?:<!-- not-run: *(?P<reason>[^>]*?) *-->\n)?^```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^```", re.S | re.M
)
SETUP = re.compile(r"<!-- setup\n(?P<code>.*?)-->", re.S)
APPS = {"lightning-compress": "config", "lightning-compress-sensitivity": "sensitivity"}


def blocks(text: str) -> list[tuple[str, str, str | None]]:
    return [(m["lang"], m["code"], m["reason"]) for m in BLOCK.finditer(text)]


def app_commands(code: str) -> list[list[str]]:
    """The commands of a bash block, continuation lines joined, comments dropped."""
    text = code.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.split("#")[0].strip()]


def first_of_sweeps(args: list[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, out = OverridesParser.create(), []
    for arg in args:
        if arg in ("-m", "--multirun"):
            continue
        (override,) = parser.parse_overrides([arg])
        if override.is_sweep_override():
            arg = f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"
        out.append(arg)
    return out


def check_schedules_fit(cfg, where: str) -> None:
    """A point of a schedule given in epochs lies within the job's ``trainer.max_epochs``: the app refuses it at setup
    otherwise (a command that shortens training must move the schedule too)."""
    max_epochs = cfg.get("trainer", {}).get("max_epochs")
    for name, node in (cfg.get("compression") or {}).items():
        for key, value in (node or {}).items():
            if str(key).endswith("_epoch") and isinstance(value, (int, float)) and isinstance(max_epochs, int):
                too_late = f"{where}: compression.{name}.{key}={value} > trainer.max_epochs={max_epochs}"
                assert value <= max_epochs, too_late


@pytest.mark.parametrize("page", PAGES)
def test_every_code_block_of_the_page_runs_or_says_why_not(page, tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from lightning_compress.apps.config import compose

    text = (ROOT / page).read_text()
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("docs_page")  # a real module, as a user's script is (dataclasses look it up)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    for setup in SETUP.finditer(text):
        exec(compile(setup["code"], f"{page} (setup)", "exec"), namespace)
    for lang, code, reason in blocks(text):
        where = f"{page}: ```{lang} block starting {code.splitlines()[0][:60]!r}"
        if reason is not None:
            assert len(reason) > 10, f"{where}: say why it is not run"
            continue
        if lang == "python":
            exec(compile(code, where, "exec"), namespace)
        elif lang == "bash":
            for command in app_commands(code):
                assert command[0] in APPS, f"{where}: not an app command; mark it <!-- not-run: <reason> -->"
                # One job of the command (a sweep's first point), composed as a single run would be.
                overrides = [*first_of_sweeps(command[1:]), f"paths.output_dir={tmp_path}", "hydra.mode=RUN"]
                cfg = compose(overrides, config_name=APPS[command[0]])
                OmegaConf.to_container(cfg, resolve=True)  # every interpolation of the job config resolves
                check_schedules_fit(cfg, where)
        elif lang == "yaml":
            yaml.safe_load(code)
        else:
            assert lang == "text", f"{where}: a ```{lang} block; run it here or mark it <!-- not-run: <reason> -->"


def test_every_page_is_in_the_navigation_and_every_public_name_in_the_api_reference():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert all(f": {p[len('docs/') :]}" in nav for p in PAGES if p.startswith("docs/")), "a page missing from nav"
    import lightning_compress

    api = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^::: lightning_compress\.(\w+)$", api, re.M)) | set(
        re.findall(r"^::: lightning_compress\.\w+(?:\.\w+)*\.(\w+)$", api, re.M)
    )
    assert set(lightning_compress.__all__) <= documented, set(lightning_compress.__all__) - documented


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True,
        text=True,
        cwd=config.parent,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


@pytest.mark.slow
def test_the_site_builds_strict_and_a_broken_link_fails_it(tmp_path):
    built = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert built.returncode == 0, built.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert 'id="lightning_compress.MagnitudePruning"' in api  # the reference is generated from the docstrings
    # The same site with one broken internal link: the strict build fails and names it.
    copy = tmp_path / "copy"
    shutil.copytree(DOCS, copy / "docs")
    for name in ("mkdocs.yml", "mkdocs_hooks.py", "benchmarks", "lightning_compress", "hydra_plugins"):
        (copy / name).symlink_to(ROOT / name)
    page = copy / "docs" / "choosing.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    broken = mkdocs_build(copy / "mkdocs.yml", tmp_path / "site2")
    assert broken.returncode != 0 and "no-such-page.md" in broken.stderr
