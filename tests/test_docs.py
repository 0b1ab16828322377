"""The docs: the generated reference pages are current, the site builds with no warning,
every page in the nav exists, and README.md stays a short front page."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from difftune import reference_docs

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
README_COMMANDS = (  # the two first commands a reader runs; CI runs the second (.ci/run)
    "pip install torch==2.13.0 && pip install -c constraints.txt -e . && difftune demo",
    "pip install torch==2.13.0 && pip install -c constraints.txt -e '.[test]' && HF_HUB_OFFLINE=1 python -m pytest -q",
)


def nav_pages(entries: object) -> list[str]:
    """Every page file named in mkdocs.yml's nav, in order."""
    if isinstance(entries, str):
        return [entries]
    if isinstance(entries, list):
        return [page for entry in entries for page in nav_pages(entry)]
    if isinstance(entries, dict):
        return [page for value in entries.values() for page in nav_pages(value)]
    return []


@pytest.mark.parametrize("name", sorted(reference_docs.pages()))
def test_generated_reference_is_current(name: str) -> None:
    page = ROOT / "docs" / "reference" / name
    rendered = reference_docs.pages()[name]
    assert page.is_file(), f"{page} is missing; run: {reference_docs.REGENERATE}"
    assert page.read_text(encoding="utf-8") == rendered, (
        f"docs/reference/{name} is stale (the config models or the CLI changed); run: {reference_docs.REGENERATE}")


def test_every_nav_page_exists() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    pages = nav_pages(config["nav"])
    assert pages, "mkdocs.yml has no nav"
    missing = [page for page in pages if not (ROOT / "docs" / page).is_file()]
    assert not missing, f"pages in mkdocs.yml's nav that docs/ lacks: {missing}"
    assert len(pages) == len(set(pages)), "a page is in the nav twice"


def test_docs_build_strict(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[test]' installs it); the docs build is not checked")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_is_a_short_front_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    count = len(readme.splitlines())
    assert count <= README_MAX_LINES, (
        f"README.md has {count} lines (at most {README_MAX_LINES}): move the details into a page under docs/")
    for command in README_COMMANDS:
        assert command in readme, f"README.md lost the command: {command}"
