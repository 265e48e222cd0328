"""The documentation stays true to the code: config defaults, config keys, relative links.

docs/config.md has one Markdown table per config section with the columns ``key | default |
description``: the full dotted key in backticks, the default as YAML in backticks (or the word
``required``). Every row must match the schema in ``semodel.config`` (read through pydantic), every
schema key must have a row, and no other page (README.md, docs/*.md) may show a different default
in such a table. Every relative link in those pages must point to a file that exists (and, with an
``#anchor`` into a Markdown file, to a heading there).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from semodel.config import Config

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DOC = ROOT / "docs" / "config.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REQUIRED = "required"
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)


# ----------------------------------------------------------------------------- the schema


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The config section class of a field (``X`` or ``X | None``), or None for a plain value."""
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def schema_defaults(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of the schema with its default (``REQUIRED`` where there is none).

    A section recurses; a section that may be left out (default None, e.g. ``data.synthetic``) is
    itself a key with the default None, and its keys are listed with their defaults too.
    """
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        key = prefix + name
        default = REQUIRED if field.is_required() else field.get_default(call_default_factory=True)
        section = _section_type(field.annotation)
        if section is None:
            out[key] = default
            continue
        if default is None:
            out[key] = None
        out.update(schema_defaults(section, key + "."))
    return out


SCHEMA = schema_defaults()


# ----------------------------------------------------------------------------- the pages


def _without_code_blocks(text: str) -> str:
    return FENCE.sub("", text)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def default_tables(path: Path) -> list[tuple[str, list[tuple[int, str, str]]]]:
    """The ``key | default | ...`` tables of a page: (heading above it, [(line, key, default)])."""
    tables, heading, rows, in_table = [], "", None, False
    lines = path.read_text(encoding="utf-8").splitlines()
    fenced = False
    for number, line in enumerate(lines, 1):
        if line.startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if fenced:
            continue
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if not line.lstrip().startswith("|"):
            in_table, rows = False, None
            continue
        cells = _cells(line)
        if not in_table:
            in_table = True
            if [c.lower() for c in cells[:2]] == ["key", "default"]:
                rows = []
                tables.append((heading, rows))
            continue
        if rows is None or set(line.replace("|", "").strip()) <= set("-: "):
            continue
        key, default = cells[0], cells[1]
        rows.append((number, key, default))
    return tables


def parse_key(cell: str) -> str:
    match = re.fullmatch(r"`([A-Za-z0-9_.]+)`", cell)
    assert match, f"the key column must be a dotted key in backticks, got {cell!r}"
    return match.group(1)


def parse_default(cell: str) -> Any:
    if cell == REQUIRED:
        return REQUIRED
    match = re.fullmatch(r"`([^`]*)`", cell)
    assert match, f"the default column must be YAML in backticks or 'required', got {cell!r}"
    return yaml.safe_load(match.group(1))


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def same_default(documented: Any, actual: Any) -> bool:
    """Equal as YAML values: tuples as lists, 16 == 16.0, but true is not 1 and '1' is not 1."""
    documented, actual = _plain(documented), _plain(actual)
    if isinstance(documented, list) and isinstance(actual, list):
        return len(documented) == len(actual) and all(map(same_default, documented, actual))
    if isinstance(documented, bool) or isinstance(actual, bool):
        return type(documented) is type(actual) and documented == actual
    numbers = (int, float)
    if isinstance(documented, numbers) and isinstance(actual, numbers):
        return float(documented) == float(actual)
    return type(documented) is type(actual) and documented == actual


def as_yaml(value: Any) -> str:
    return yaml.safe_dump(_plain(value), default_flow_style=True).strip().removesuffix("...").strip()


def documented_rows(path: Path) -> list[tuple[int, str, Any]]:
    return [
        (line, parse_key(key), parse_default(default))
        for _, rows in default_tables(path)
        for line, key, default in rows
    ]


# ----------------------------------------------------------------------------- config tests


def test_schema_walk_finds_the_known_keys():
    """Guards the walk itself: a few keys of every kind, with their real defaults."""
    assert SCHEMA["data.root"] == REQUIRED
    assert SCHEMA["data.synthetic"] is None and SCHEMA["data.synthetic.per_class"] == 100
    assert SCHEMA["model.learned.penalty"] == 0.05
    assert SCHEMA["train.ema"] is False and SCHEMA["train.monitor"] == "val_acc"
    assert _plain(SCHEMA["data.augment.scale"]) == [0.35, 1.0]
    assert len(SCHEMA) > 70


def test_config_reference_has_a_row_for_every_key():
    keys = [key for _, key, _ in documented_rows(CONFIG_DOC)]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    assert not duplicates, f"{CONFIG_DOC.name}: keys listed twice: {', '.join(duplicates)}"
    missing = sorted(set(SCHEMA) - set(keys))
    assert not missing, f"{CONFIG_DOC.name} has no row for: {', '.join(missing)}"


def test_config_reference_tables_follow_the_sections():
    """Each table sits under the heading of its section (``## data.split``) and lists its keys only."""
    tables = default_tables(CONFIG_DOC)
    assert len(tables) >= 11
    for heading, rows in tables:
        for line, key, _ in rows:
            section = parse_key(key).rpartition(".")[0]
            assert section == heading, f"{CONFIG_DOC.name}:{line}: {key} is not a key of section '{heading}'"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_defaults_match_the_schema(page):
    """Every ``key | default`` row of every page: a key of the schema, with the schema's default."""
    wrong = []
    for line, key, documented in documented_rows(page):
        if key not in SCHEMA:
            wrong.append(f"{page.name}:{line}: `{key}` is not a config key")
        elif not same_default(documented, SCHEMA[key]):
            code = REQUIRED if SCHEMA[key] == REQUIRED else as_yaml(SCHEMA[key])
            docs = REQUIRED if documented == REQUIRED else as_yaml(documented)
            wrong.append(f"{page.name}:{line}: `{key}` is {docs} in the docs, {code} in the code")
    assert not wrong, "\n".join(wrong)


def test_the_checker_catches_a_wrong_default(tmp_path):
    """The comparison is strict enough: a changed default, a bool as 1, a missing key all fail."""
    assert same_default(16, 16.0) and same_default([0.35, 1], (0.35, 1.0)) and same_default(None, None)
    assert not same_default(1, True) and not same_default("0.1", 0.1)
    assert not same_default([0.35], (0.35, 1.0)) and not same_default("none", None)
    page = tmp_path / "page.md"
    page.write_text(
        "# train\n\n| key | default | description |\n|---|---|---|\n| `train.ema` | `true` | x |\n",
        encoding="utf-8",
    )
    [(_, key, documented)] = documented_rows(page)
    assert key == "train.ema" and not same_default(documented, SCHEMA[key])


# ----------------------------------------------------------------------------- links

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in _without_code_blocks(page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            unique, n = slug, 0
            while unique in found:
                n += 1
                unique = f"{slug}-{n}"
            found.add(unique)
    found.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", page.read_text(encoding="utf-8")))
    return found


def relative_links(page: Path) -> list[str]:
    text = _without_code_blocks(page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    targets = LINK.findall(text) + REFERENCE.findall(text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    broken = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {dest.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_link_checker_sees_links(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "# Top\n\nSee [a](missing.md), [b](p.md#top), [c](https://x.org/y), `[d](no.md)`.\n\n"
        "```\n[e](no.md)\n```\n",
        encoding="utf-8",
    )
    assert relative_links(page) == ["missing.md", "p.md#top"]
    assert "top" in anchors(page)
    assert _slug("Attention variants: SE, learned SE") == "attention-variants-se-learned-se"
    assert _slug("`data.cache` against DataLoader workers") == "datacache-against-dataloader-workers"
