"""The config and CLI reference pages (docs/reference/), rendered from the code so that
they cannot drift from it: the config's pydantic sections with each key's type, default
and attribute docstring, and the argparse parser with each command's help and options
(difftune.cli_reference renders that page).

    python -m difftune.reference_docs            # writes docs/reference/config.md and cli.md
    python -m difftune.reference_docs --check    # exit 1 when the pages are stale

Torch-free: it reads the config models, the catalog and the parser, nothing heavier.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

REGENERATE = "python -m difftune.reference_docs"
OBJECTIVE_NAMES = {"ddpm": "DDPM", "flow_matching": "Flow-matching"}
"""How the page names each objective kind (FamilyFacts.objective_kind)."""
USAGE_WIDTH = 88
"""Columns of the usage lines: fixed, so the page does not depend on the terminal."""


# ---------------------------------------------------------------------------- text


def one_paragraph(text: str | None) -> str:
    """A docstring as one line of text (its lines and paragraphs joined by spaces)."""
    return " ".join(inspect.cleandoc(text).split()) if text else ""


def markdown_cell(text: str) -> str:
    """Text for a page or a table cell: outside code spans, `|` would end a cell, `<` open
    an HTML tag and `*` start emphasis."""
    pieces = text.split("`")
    for index in range(0, len(pieces), 2):  # the even pieces are outside code spans
        pieces[index] = pieces[index].replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(
            "*", "\\*")
    return "`".join(pieces)


def _number(value: float) -> str:
    """A bound or default as a reader writes it: 2^32 and 10^9 rather than their digits,
    1e-8 rather than Python's 1e-08."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if value >= 2**16 and value & (value - 1) == 0:
            return f"2^{value.bit_length() - 1}"
        if value >= 10**6 and str(value).rstrip("0") == "1":
            return f"10^{len(str(value)) - 1}"
        return str(value)
    return re.sub(r"e([+-])0*(\d)", lambda m: f"e{m.group(1).lstrip('+')}{m.group(2)}", repr(value))


def _toml(value: Any) -> str:
    """A default as the TOML that writes it."""
    if isinstance(value, (bool, int, float)):
        return _number(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return repr(value)


# ---------------------------------------------------------------------------- config


def attribute_docstrings(cls: type) -> dict[str, str]:
    """The docstring under each annotated attribute of `cls` and of the classes it
    inherits from (within difftune), read from their source: the way the models document
    their keys (pydantic's `use_attribute_docstrings` is not set, so `description` is empty)."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("difftune"):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = next(node for node in tree.body if isinstance(node, ast.ClassDef)).body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                found[node.target.id] = following.value.value
    return found


def _bounds(metadata: list[Any]) -> list[str]:
    """What a field's constraints (annotated_types, pydantic's pattern) allow, in words."""
    lower = upper = None
    words = []
    pattern = next((item.pattern for item in metadata if getattr(item, "pattern", None)), None)
    for item in metadata:
        for name in ("gt", "ge"):
            if getattr(item, name, None) is not None:
                lower = (name, getattr(item, name))
        for name in ("lt", "le"):
            if getattr(item, name, None) is not None:
                upper = (name, getattr(item, name))
        if getattr(item, "min_length", None):
            if item.min_length > 1:
                words.append(f"at least {item.min_length} long")
            else:
                words.append("not blank" if pattern == r"\S" else "not empty")
        if getattr(item, "max_length", None):
            words.append(f"at most {item.max_length} long")
    if pattern and pattern != r"\S":
        words.append(f"matching `{pattern}`")
    if lower and upper:
        words.insert(0, f"in {'(' if lower[0] == 'gt' else '['}{_number(lower[1])}, "
                        f"{_number(upper[1])}{')' if upper[0] == 'lt' else ']'}")
    elif lower:
        words.insert(0, f"{'>' if lower[0] == 'gt' else '≥'} {_number(lower[1])}")
    elif upper:
        words.insert(0, f"{'<' if upper[0] == 'lt' else '≤'} {_number(upper[1])}")
    return words


def type_text(annotation: Any, metadata: list[Any] | tuple[Any, ...] = ()) -> str:
    """A field's type as a reader of the TOML needs it: `"a"`, `"b"` for a choice, "list
    of str", "int in [0, 2^32)"; `None` left out (an unset key is its default)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        inner = [item for extra in args[1:] for item in
                 (extra.metadata if isinstance(extra, FieldInfo) else [extra])]
        text = type_text(args[0], inner)
    elif origin in (typing.Union, types.UnionType):
        text = " or ".join(type_text(arg) for arg in args if arg is not type(None))
    elif origin is typing.Literal:
        text = ", ".join(f"`{_toml(value)}`" for value in args)
    elif origin is list:
        item = type_text(args[0]) if args else "any"
        text = f"list of {'(' + item + ')' if ' or ' in item else item}"
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        text = "table"
    else:
        text = getattr(annotation, "__name__", str(annotation))
    for bound in _bounds(list(metadata)):  # "int > 0", "str, not blank"
        text += f" {bound}" if bound[0] in "><≥≤" or bound.startswith("in ") else f", {bound}"
    return text


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "*required*"
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "its defaults"
    if value is PydanticUndefined:
        return ""
    return f"`{_toml(value)}`"


def _table_class(annotation: Any) -> type[BaseModel] | None:
    """The settings class of a key that is a table of its own ([method.lora]), if it is one."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def field_rows(cls: type[BaseModel], prefix: str, skip: tuple[str, ...] = (),
               notes: dict[str, str] | None = None) -> list[str]:
    """The key table of one section, keys in declaration order."""
    docs = attribute_docstrings(cls)
    rows = ["| Key | Type | Default | Meaning |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        table = _table_class(field.annotation)
        kind = f"table `[{prefix}.{name}]`" if table is not None else type_text(field.annotation, field.metadata)
        meaning = " ".join(filter(None, [(notes or {}).get(name), one_paragraph(field.description or docs.get(name))]))
        rows.append(f"| `{name}` | {markdown_cell(kind) if table is None else kind} | {default_text(field)} "
                    f"| {markdown_cell(meaning)} |")
    return rows


def _section(title: str, cls: type[BaseModel], prefix: str, **options: Any) -> list[str]:
    lines = [f"## `[{title}]`", ""]
    if cls.__doc__:
        lines += [markdown_cell(one_paragraph(cls.__doc__)), ""]
    return lines + field_rows(cls, prefix, **options) + [""]


def _families_table() -> list[str]:
    from difftune.catalog import families

    rows = ["| `model.family` | What | Objective | Native size (`data.resolution` default) | Method kinds it trains |",
            "|---|---|---|---|---|"]
    for name in sorted(families()):
        facts = families()[name]
        kinds = ", ".join(f"`{kind}`" for kind in sorted(facts.supports))
        objective = OBJECTIVE_NAMES.get(facts.objective_kind, facts.objective_kind)
        rows.append(f"| `{name}` | {markdown_cell(facts.description)} | {objective} | {facts.default_resolution} "
                    f"| {kinds} |")
    return rows


def _method_section() -> list[str]:
    """[method]: one table per kind (each kind takes only its own keys), then each sub-table
    ([method.lora], ...) once, with the kinds that take it."""
    from difftune.catalog import methods

    lines = ["## `[method]`", "",
             "`kind` picks the method; each kind takes only the keys in its table below, and another kind's "
             "key is refused. Without `kind` the table is " + ", ".join(
                 f"`{kind}`" for kind, spec in methods().items() if spec.default) + "'s.", ""]
    tables: dict[str, tuple[type[BaseModel], list[str]]] = {}
    for kind, spec in methods().items():
        settings = spec.settings
        lines += [f"### `kind = \"{kind}\"`", "", markdown_cell(spec.description[:1].upper() + spec.description[1:])
                  + ".", ""]
        if settings.__doc__:
            lines += [markdown_cell(one_paragraph(settings.__doc__)), ""]
        if list(settings.model_fields) == ["kind"]:
            lines += ["No keys besides `kind`.", ""]
            continue
        lines += field_rows(settings, "method", skip=("kind",)) + [""]
        for name, field in settings.model_fields.items():
            table = _table_class(field.annotation)
            if table is not None:
                tables.setdefault(name, (table, []))[1].append(kind)
    for name, (table, kinds) in tables.items():
        lines += [f"### `[method.{name}]`", "", "For " + ", ".join(f"`{kind}`" for kind in kinds) + ".", ""]
        if table.__doc__:
            lines += [markdown_cell(one_paragraph(table.__doc__)), ""]
        lines += field_rows(table, f"method.{name}") + [""]
    return lines


def render_config() -> str:
    """docs/reference/config.md."""
    from difftune.config.run import RunConfig
    from difftune.config.sections import OBJECTIVE_OPTIONS

    lines = [
        "# Config reference", "",
        f"<!-- Generated by `{REGENERATE}` from src/difftune/config/ and each method's spec.py: "
        "edit the docstrings there, not this page. -->", "",
        "A run is one TOML file with the sections below. Keys marked *required* have no default. \"unset\" "
        "means the default is `None`: leave the key out, since TOML has no null. Every section rejects unknown "
        "keys and values of the wrong type (an integer is accepted where a float is expected), and every "
        "problem is reported at once, each with its key path, before any model loads. "
        "`difftune train CONFIG --set section.key=value` overrides any key.", "",
        f"This page is generated from the code (`{REGENERATE}`): each key's type, default and the docstring "
        "under it in `src/difftune/config/` and `src/difftune/methods/<kind>/spec.py`.", "",
    ]
    notes = {"objective": {name: f"{OBJECTIVE_NAMES.get(kind, kind)} families only."
                           for kind, names in OBJECTIVE_OPTIONS.items() for name in names}}
    for name, field in RunConfig.model_fields.items():
        if name == "method":
            lines += _method_section()
            continue
        section = _table_class(field.annotation)
        assert section is not None, name
        lines += _section(name, section, name, notes=notes.get(name))
        if name == "model":
            lines += ["Families, and what each trains (a pair not listed is refused when the config loads):", ""]
            lines += _families_table() + [""]
        if name == "data":
            lines += ["`data.resolution` left out takes the family's native size (the table under `[model]`).",
                      ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------- pages


def default_out() -> Path:
    """docs/reference/ of the repository this module sits in (src/difftune/..)."""
    return Path(__file__).resolve().parents[2] / "docs" / "reference"


def pages() -> dict[str, str]:
    """Each generated page's file name and text."""
    from difftune.cli_reference import render_cli

    return {"config.md": render_config(), "cli.md": render_cli()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m difftune.reference_docs",
                                     description="Write the config and CLI reference pages.")
    parser.add_argument("--out", type=Path, default=None, help="folder to write into (default: docs/reference/ "
                        "of the repository this module is in)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page differs")
    args = parser.parse_args(argv)
    out = args.out or default_out()
    stale = []
    for name, text in pages().items():
        path = out / name
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if args.check and stale:
        print(f"stale: {', '.join(map(str, stale))}; run: {REGENERATE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
