"""``semodel config init`` and ``semodel config show --defaults``: a commented YAML template.

Every key of the schema (``semodel.config.Config``, walked recursively) with its value (the
defaults, or what ``--data``, ``--model``, ... set) and a one-line comment: the field's description
in the schema. With ``--data``, the header lists the classes and image counts found there, and
where the file names start with an id (``M01_02.jpg``, ``NM12_03.jpg``) a regex for
``data.split.group_by`` is suggested, as a comment: whether one id means one patient is for the
user to confirm, so it is never applied.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from semodel.config import Config, StartOptions, config_from_options
from semodel.data import Dataset, scan_dataset

COMMENT_COLUMN = 40  # where the comments start (longer lines push theirs to the right)


# ----------------------------------------------------------------------------- group_by guess


@dataclass
class GroupGuess:
    """A regex whose first group names a file's group, and what it makes of the files."""

    pattern: str
    files: int  # the files it matched
    total: int  # all files
    groups: int
    largest: int  # files in the largest group
    shared: int  # files in a group with at least one other file
    example: tuple[str, str]  # a file name and its group


SEPARATORS = re.compile(r"([_\-. ]+)")


def _token_shape(token: str) -> str | None:
    """A regex for tokens like this one: ``\\d+`` (12), ``[A-Za-z]+\\d+`` (NM12), ``[A-Za-z]+``."""
    if token.isdigit():
        return r"\d+"
    if re.fullmatch(r"[A-Za-z]+\d+", token):
        return r"[A-Za-z]+\d+"
    if re.fullmatch(r"[A-Za-z]+", token):
        return r"[A-Za-z]+"
    if re.fullmatch(r"[A-Za-z0-9]+", token):
        return r"[A-Za-z0-9]+"
    return None


def _prefix_pattern(stems: list[str], depth: int) -> str | None:
    """The regex of the most common shape of the first ``depth`` tokens of the names (followed by a
    separator, so that the rest of the name is not part of the group); None if it names no id."""
    shapes: Counter[str] = Counter()
    for stem in stems:
        parts = SEPARATORS.split(stem)  # token, separator, token, ...
        if len(parts) < 2 * depth + 1:  # the prefix would be the whole name
            continue
        tokens = [_token_shape(t) for t in parts[0 : 2 * depth : 2]]
        separators = [re.escape(s) for s in parts[1 : 2 * depth : 2]]  # one after each token
        if None in tokens or not any(r"\d" in t for t in tokens):  # an id has a digit
            continue
        group = "".join(t + s for t, s in zip(tokens[:-1], separators[:-1], strict=True)) + tokens[-1]
        shapes[f"^({group}){separators[-1]}"] += 1
    return shapes.most_common(1)[0][0] if shapes else None


def evaluate_pattern(pattern: str, names: list[str]) -> GroupGuess:
    regex = re.compile(pattern)
    groups: Counter[str] = Counter()
    example = ("", "")
    for name in names:
        m = regex.search(name)
        if m:
            groups[m.group(1)] += 1
            example = example if example[0] else (name, m.group(1))
    files = sum(groups.values())
    shared = sum(n for n in groups.values() if n > 1)
    return GroupGuess(
        pattern, files, len(names), len(groups), max(groups.values(), default=0), shared, example
    )


def plausible(guess: GroupGuess) -> bool:
    """Most files matched, several groups, a fair share of files with company in their group, and no
    group that holds half of everything (that is a class or a camera prefix, not an id)."""
    return (
        guess.files >= 0.8 * guess.total
        and guess.groups >= 4
        and guess.shared >= 0.3 * guess.files
        and guess.largest <= 0.5 * guess.files
    )


def guess_group_by(names: list[str]) -> GroupGuess | None:
    """A ``data.split.group_by`` regex for file names that start with an id (``M01_02_05.jpg`` ->
    ``M01``): the shortest prefix of 1-3 tokens whose grouping is ``plausible``; else None."""
    stems = [Path(n).stem for n in names]
    for depth in (1, 2, 3):
        pattern = _prefix_pattern(stems, depth)
        if pattern is not None:
            guess = evaluate_pattern(pattern, names)
            if plausible(guess):
                return guess
    return None


# ----------------------------------------------------------------------------- the template


def _section_type(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def yaml_scalar(value: Any) -> str:
    """``value`` as one line of YAML (flow style for lists)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True)
    return text.strip().removesuffix("...").strip()


def quoted(text: str) -> str:
    """A YAML string in single quotes (a regex reads best that way: no escapes needed)."""
    return yaml.safe_dump(text, default_style="'", width=10_000).strip().removesuffix("...").strip()


def schema_lines(model: type[BaseModel], values: dict[str, Any], indent: int = 0) -> list[tuple[str, str]]:
    """(YAML line, comment) for every key of ``model``, nested sections indented; an optional
    section that is null (``data.synthetic``) shows its keys commented out."""
    lines: list[tuple[str, str]] = []
    pad = " " * indent
    for name, info in model.model_fields.items():
        value, section = values.get(name), _section_type(info.annotation)
        comment = info.description or ""
        if section is not None and isinstance(value, dict):
            lines.append((f"{pad}{name}:", comment))
            lines += schema_lines(section, value, indent + 2)
        elif section is not None and value is None:
            lines.append((f"{pad}{name}: null", comment + "; its keys:"))
            defaults = section().model_dump(mode="json")
            lines += [(f"{pad}  # {text.strip()}", note) for text, note in schema_lines(section, defaults)]
        else:
            lines.append((f"{pad}{name}: {yaml_scalar(_plain(value))}", comment))
    return lines


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def data_summary(data: Dataset) -> list[str]:
    """Comment lines: the classes and their image counts (per split when the folder is split)."""
    total = len(data.samples)
    if data.split_folders:
        how = "split into " + " ".join(f"{name}/" for name in data.split_folders.values())
        if "val" not in data.split_folders:
            how += "; data.split.val of the training images is held out for validation"
    else:
        how = "no split folders: data.split divides them"
    lines = [f"{data.root}: {len(data.classes)} classes, {total} images ({how})"]
    width = max(len(c) for c in data.classes)
    for label, name in enumerate(data.classes):
        mine = [s for s in data.samples if s.label == label]
        if data.split_folders:
            counts = Counter(s.split for s in mine)
            detail = "  ".join(
                f"{split} {counts[split]}" for split in ("train", "val", "test") if counts[split]
            )
            lines.append(f"  {name.ljust(width)}  {len(mine):>6}  ({detail})")
        else:
            lines.append(f"  {name.ljust(width)}  {len(mine):>6}")
    return lines


def group_note(guess: GroupGuess, indent: int) -> list[tuple[str, str]]:
    pad = " " * indent
    name, group = guess.example
    sizes = f"{guess.groups} ids, up to {guess.largest} files each"
    text = [
        f"SUGGESTION, not applied: the file names start with an id ({name} -> {group}):",
        f"{sizes}, {guess.files} of {guess.total} files matched. If one id is one patient or object,",
        "replace the group_by line above with this one, so that no id lands in two splits:",
    ]
    lines = [*text, f"group_by: {quoted(guess.pattern)}"]
    return [(f"{pad}# {line}", "") for line in lines]


def config_template(options: StartOptions, command: str) -> str:
    """The commented template: ``options`` (``--data`` etc.) applied to the defaults; ``command``
    is what wrote it (for the header)."""
    if options.data is not None:
        values = config_from_options(None, [], options).to_dict()
        values["log"]["name"] = None  # a config file names its runs after itself
        data = scan_dataset(options.data, check=False)
    else:
        values = config_from_options(None, [], StartOptions(**{**vars(options), "data": "-"})).to_dict()
        values["data"]["root"] = None
        values["log"]["name"] = None
        data = None
    header = [
        f"semodel experiment config, written by: {command}",
        "Every key with its value and what it does. A config needs only the keys it changes:",
        "delete the others if you like. Check it with: semodel config show --config FILE",
        "and train with: semodel train --config FILE",
    ]
    if data is None:
        header.append("data.root has no default: set it to your folder of class folders.")
    else:
        header += ["", *data_summary(data)]
    lines = [(f"# {line}".rstrip(), "") for line in header] + [("", "")]
    lines += schema_lines(Config, values)
    if data is not None and (guess := guess_group_by([Path(s.path).name for s in data.samples])):
        at = next(i for i, (text, _) in enumerate(lines) if text.strip().startswith("group_by:"))
        indent = len(lines[at][0]) - len(lines[at][0].lstrip())
        lines[at + 1 : at + 1] = group_note(guess, indent)
    return render_all(lines)


def render_all(lines: list[tuple[str, str]]) -> str:
    keyed = [text for text, comment in lines if comment]
    width = min(max(map(len, keyed), default=0), COMMENT_COLUMN)
    out = [f"{text.ljust(width)}  # {comment}" if comment else text for text, comment in lines]
    return "\n".join(out) + "\n"
