"""The tested set of versions: pyproject's bounds, constraints.txt, and the startup check
that names a known-broken pair."""

import re
import tomllib
from pathlib import Path

from conftest import run_config
from packaging.requirements import Requirement
from packaging.version import Version

from difftune.config import build_config
from difftune.versions import KNOWN_BROKEN, broken_pairs, installed_versions, problems_for

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = Version(version)
    return pins


def test_constraints_satisfy_every_bound_in_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    pins = _pins()
    for text in requirements:
        requirement = Requirement(text)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name == "torch":
            assert name not in pins  # installed on its own: the CPU or the GPU build
            continue
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert pins[name] in requirement.specifier, f"{name}=={pins[name]} is outside {requirement.specifier}"


def test_the_tested_set_holds_no_known_broken_pair() -> None:
    pins = _pins()
    assert broken_pairs({name: pins.get(name) for p in KNOWN_BROKEN for name in (p.package, p.other)}) == []
    assert broken_pairs() == [], "this environment holds a known-broken pair"


def test_pyproject_bounds_exclude_each_known_broken_pair() -> None:
    """pip must not resolve a broken pair: the bound on the package stops below it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {Requirement(t).name: Requirement(t).specifier for t in project["dependencies"]}
    for pair in KNOWN_BROKEN:
        assert Version(pair.from_version) not in bounds[pair.package]


def test_a_broken_pair_is_named_in_one_sentence_and_refuses_the_run_that_needs_it(tmp_path: Path) -> None:
    versions = {"transformers": Version("5.24.0"), "peft": Version("0.21.2")}
    [(_, sentence)] = broken_pairs(versions)
    assert sentence.count(". ") == 0 and "transformers 5.24.0 with peft 0.21.2" in sentence
    assert "pip install -c constraints.txt" in sentence
    lora_te = build_config(run_config(tmp_path, tmp_path, tmp_path / "run", method={
        "kind": "lora", "train_text_encoder": True}))
    controlnet = build_config(run_config(tmp_path, tmp_path, tmp_path / "run"))
    assert problems_for(lora_te, versions) == [sentence]
    assert problems_for(controlnet, versions) == []  # ControlNet never touches the pair
    fine = {"transformers": Version("5.23.0"), "peft": Version("0.21.2")}
    assert problems_for(lora_te, fine) == []


def test_installed_versions_reads_metadata_only() -> None:
    found = installed_versions({"peft", "surely-not-a-package"})
    assert found["peft"] is not None and found["surely-not-a-package"] is None
