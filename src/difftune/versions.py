"""Known-broken pairs of installed packages, named in one sentence before they break a run.

pyproject's bounds keep pip from resolving these pairs, and constraints.txt pins the set
CI tested. But an environment built some other way (an older install, a notebook, the
newest releases on purpose) can still hold a broken pair; difftune then says which pair,
what breaks, and how to install the tested set, before any model loads, instead of a
traceback from inside a library. Only importlib.metadata is read here (no imports of the
packages themselves), so the check costs milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

from packaging.version import InvalidVersion, Version

FIX = "'pip install -c constraints.txt -e .' in a clone of difftune"


@dataclass(frozen=True)
class BrokenPair:
    """`package` at `from_version` or newer with `other` below `other_below` breaks `what`."""

    package: str
    from_version: str
    other: str
    other_below: str
    what: str
    """What fails, in words a user recognises."""
    feature: str
    """The config feature that needs the pair (see `BrokenPair.used_by`)."""

    def found(self, versions: dict[str, Version | None]) -> bool:
        mine, theirs = versions.get(self.package), versions.get(self.other)
        if mine is None or theirs is None:
            return False
        return mine >= Version(self.from_version) and theirs < Version(self.other_below)

    def sentence(self, versions: dict[str, Version | None]) -> str:
        return (f"{self.package} {versions[self.package]} with {self.other} {versions[self.other]}: "
                f"{self.package} {self.from_version} and newer refuse {self.other} below {self.other_below}, "
                f"so {self.what} fails; install the tested set with {FIX}, "
                f"or pip install '{self.package}<{self.from_version}'")


KNOWN_BROKEN = (
    BrokenPair("transformers", "5.24", "peft", "0.22",
               "LoRA on the text encoder (method.train_text_encoder with LoRA)", "text_encoder_lora"),
)


def installed_versions(names: set[str]) -> dict[str, Version | None]:
    versions: dict[str, Version | None] = {}
    for name in names:
        try:
            versions[name] = Version(metadata.version(name))
        except (metadata.PackageNotFoundError, InvalidVersion):
            versions[name] = None
    return versions


def broken_pairs(versions: dict[str, Version | None] | None = None) -> list[tuple[BrokenPair, str]]:
    """Each known-broken pair that is installed, with its sentence."""
    if versions is None:
        versions = installed_versions({name for p in KNOWN_BROKEN for name in (p.package, p.other)})
    return [(pair, pair.sentence(versions)) for pair in KNOWN_BROKEN if pair.found(versions)]


def features_used(config: object) -> set[str]:
    """The features of a run config that a broken pair can touch."""
    method = getattr(config, "method", None)
    used = set()
    if method is not None and method.trains_text_encoder and method.uses_lora:
        used.add("text_encoder_lora")
    return used


def problems_for(config: object, versions: dict[str, Version | None] | None = None) -> list[str]:
    """Sentences for the broken pairs this run would hit (checked before models load)."""
    used = features_used(config)
    return [sentence for pair, sentence in broken_pairs(versions) if pair.feature in used]
