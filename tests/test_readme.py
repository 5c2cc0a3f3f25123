"""The README's commands are the ones CI runs, and the configs it names exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def test_ci_runs_the_readme_test_command():
    test_commands = [b.strip() for b in bash_blocks() if "pytest" in b]
    assert len(test_commands) == 1
    setup_and_test = test_commands[0].split("&&", 2)[2].strip()  # after creating and activating the venv
    assert setup_and_test in (ROOT / ".ci" / "run").read_text()


def test_main_job_command_installs_and_runs_the_app():
    (main_job,) = [b.strip() for b in bash_blocks() if b.strip().endswith("&& lightning-compress")]
    assert "pip install ." in main_job


def test_the_readme_fits_on_a_screen_and_links_to_the_docs():
    assert len(README.splitlines()) <= 150
    assert "mkdocs serve" in README and "(docs/index.md)" in README


def test_every_shipped_recipe_is_in_the_docs_recipe_table():
    table = (ROOT / "docs" / "hydra.md").read_text()
    named = set(re.findall(r"^\| `([a-z0-9_]+)`", table, re.M))
    shipped = {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    assert named == shipped
