"""Where a scan's images and labels come from, besides class folders: a list file (CSV or
JSON Lines) naming each image and its label, or labels and groups taken from file names.

Each reader yields `Listed` rows one at a time (the file is never held whole); scan.py
checks the images, splits and reports them as it does for class folders.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path
from typing import Iterator

from tlapp.constants import SPLITS
from tlapp.errors import UserInputError

LIST_SUFFIXES = (".csv", ".jsonl")
LABEL_SEPARATOR = ";"  # several labels in one CSV cell (multi-label)


@dataclasses.dataclass(frozen=True, slots=True)
class Listed:
    """One row of a list file: the image (relative to the list's folder, or absolute), its
    label(s), the split and group it was given (or None), and its line number."""

    path: str
    labels: tuple[str, ...]
    split: str | None
    group: str | None
    line: int


def is_list_file(data: str | Path) -> bool:
    return Path(data).suffix.lower() in LIST_SUFFIXES and Path(data).expanduser().is_file()


def read_list(path: Path, path_column: str = "path", label_column: str = "label",
              labels: bool = True) -> Iterator[Listed]:
    """The rows of a CSV (header first) or JSON Lines file, in order.

    With labels=False (prediction) the label column is not required. A row with an empty
    label is yielded with no labels (the scan lists it as skipped).

    Raises:
        UserInputError: a file with no header, a missing column, a row with more or fewer
            fields than the header, a bad JSON line or an unknown split; naming the line.
    """
    reader = _read_jsonl if path.suffix.lower() == ".jsonl" else _read_csv
    yield from reader(path, path_column, label_column, labels)


def _read_csv(path: Path, path_column: str, label_column: str, labels: bool
              ) -> Iterator[Listed]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if not header:
            raise UserInputError(f"{path} is empty: a CSV needs a header line naming its "
                                 f"columns ({path_column}, {label_column}, optionally split, "
                                 f"group).")
        header = [name.strip() for name in header]
        columns = {name: i for i, name in enumerate(header)}
        wanted = [path_column] + ([label_column] if labels else [])
        missing = [name for name in wanted if name not in columns]
        if missing:
            raise UserInputError(
                f"{path}, line 1: no column {', '.join(map(repr, missing))}. The header has "
                f"{', '.join(map(repr, header))}. Name the columns with --path-column and "
                f"--label-column, or add a header line.")
        at = columns.get
        for row in rows:
            line = rows.line_num
            if not row or row == [""]:
                continue
            if len(row) != len(header):
                raise UserInputError(
                    f"{path}, line {line}: {len(row)} field(s) where the header has "
                    f"{len(header)}. Quote values that contain a comma, and use commas as "
                    f"the only delimiter. Received: {','.join(row)[:200]!r}")
            cell = row[at(label_column)].strip() if labels else ""
            yield Listed(row[at(path_column)].strip(), _split_labels(cell),
                         _given_split(path, line, row[at("split")].strip())
                         if "split" in columns else None,
                         row[at("group")].strip() or None if "group" in columns else None,
                         line)


def _read_jsonl(path: Path, path_column: str, label_column: str, labels: bool
                ) -> Iterator[Listed]:
    with open(path, encoding="utf-8-sig") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                item = json.loads(text)
            except ValueError as e:
                raise UserInputError(f"{path}, line {line}: not valid JSON ({e}).") from None
            if not isinstance(item, dict) or not isinstance(item.get(path_column), str):
                raise UserInputError(f"{path}, line {line}: each line must be a JSON object "
                                     f"with a string {path_column!r}. Received: "
                                     f"{text.strip()[:200]}")
            value = item.get(label_column, item.get("labels")) if labels else None
            if isinstance(value, list):
                found = tuple(str(v).strip() for v in value if str(v).strip())
            else:
                found = _split_labels("" if value is None else str(value))
            split = item.get("split")
            group = item.get("group")
            yield Listed(item[path_column].strip(), found,
                         _given_split(path, line, str(split)) if split else None,
                         str(group) if group not in (None, "") else None, line)


def _split_labels(cell: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in cell.split(LABEL_SEPARATOR) if part.strip())


def _given_split(path: Path, line: int, value: str) -> str | None:
    if not value:
        return None
    if value not in SPLITS:
        raise UserInputError(f"{path}, line {line}: split must be one of {', '.join(SPLITS)} "
                             f"(or empty). Received: split={value!r}")
    return value


def compile_pattern(pattern: str | None, option: str) -> re.Pattern | None:
    """The regular expression of --label-from or --group-by, checked: it must compile and
    have a capture group."""
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise UserInputError(f"{option} is not a valid regular expression ({e}). "
                             f"Received: {option}={pattern!r}") from None
    if compiled.groups < 1:
        raise UserInputError(f"{option} needs a capture group (the part in parentheses is "
                             f"the value), e.g. '([^/]+)_\\d+\\.jpg$'. Received: "
                             f"{option}={pattern!r}")
    return compiled


def match(pattern: re.Pattern, relative: str) -> str | None:
    """The first capture group of `pattern` searched in a relative path, or None."""
    found = pattern.search(relative)
    return found.group(1) if found and found.group(1) else None
