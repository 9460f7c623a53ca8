"""Finding an image folder's candidate files: every file under it listed as plain strings
(a class-per-folder tree, train/ val/ test/, a list file, or labels from file names),
each a candidate image of a class or ignored (hidden, system and non-image files).

The candidates are compact parallel columns (`Candidates`), not an object per file.
"""
from __future__ import annotations

import array
import collections
import dataclasses
import logging
import os
import time
import unicodedata
from pathlib import Path

from tlapp.constants import IMAGE_EXTENSIONS, SPLITS
from tlapp.data import sources
from tlapp.errors import UserInputError

log = logging.getLogger(__name__)

# Images tlapp does not read: checked anyway (a PNG named .tif is used), else skipped with
# reason "unsupported format" so that they are listed rather than silently ignored.
OTHER_IMAGE_EXTENSIONS = (".tif", ".tiff", ".heic", ".heif", ".avif", ".jp2", ".j2k", ".jxl",
                          ".ico", ".icns", ".psd", ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
                          ".dds", ".pcx", ".svg", ".dng", ".cr2", ".nef", ".arw")
CANDIDATE_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS)
SYSTEM_NAMES = ("thumbs.db", "desktop.ini", "__macosx")  # plus every name starting with "."
LINE_BREAKING = ("Cc", "Zl", "Zp")  # categories that break a file listing one label per line
LIST_LOG_S = 10.0  # while listing a huge folder, say how far it got this often


def is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def walk(folder: str):
    """(directory relative to `folder` with forward slashes, "" for itself; sorted names of
    its files) for every directory, following symlinks; a directory reached twice (a
    symlink loop, or two links to one place) is listed once."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        relative = os.path.relpath(dirpath, folder)
        yield ("" if relative == "." else relative.replace(os.sep, "/")), sorted(filenames)


def list_files(folder: Path) -> list[Path]:
    """Every file under `folder` (see `walk`), as paths."""
    return [Path(folder) / directory / name for directory, names in walk(str(folder))
            for name in names]


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_ignored(p.name))


def _check_class_name(folder: Path) -> None:
    bad = [ch for ch in folder.name if unicodedata.category(ch) in LINE_BREAKING]
    if bad:
        raise UserInputError(
            f"The class folder name {folder.name!r} (in {folder.parent}) contains a control "
            f"or line-break character ({', '.join(sorted({repr(c) for c in bad}))}), which "
            f"would break labels.txt and every file that lists one label per line. Rename "
            f"the folder.")


@dataclasses.dataclass
class Candidates:
    """The files that may be images of a class: parallel compact columns."""

    paths: list = dataclasses.field(default_factory=list)  # relative, forward slashes
    labels: array.array = dataclasses.field(default_factory=lambda: array.array("i"))
    given: list = dataclasses.field(default_factory=list)  # the split folder, or None
    groups: list | None = None  # the group of each (None: its own), when grouping
    lines: array.array | None = None  # a list file's line of each
    multi: list | None = None  # multi-label: the labels of each (a tuple)

    def add(self, path: str, label: int | tuple, given: str | None = None,
            group: str | None = None, line: int | None = None) -> None:
        self.paths.append(path)
        if self.multi is not None:
            self.multi.append(label)
            label = label[0]
        self.labels.append(label)
        self.given.append(given)
        if self.groups is not None:
            self.groups.append(group)
        if self.lines is not None:
            self.lines.append(line)


def _find_candidates(root: Path, split_roots: dict[str, Path], classes: list[str]
                     ) -> tuple[Candidates, list[str]]:
    """Every file under `root`: a candidate image of a class, or ignored."""
    label_of = {name: i for i, name in enumerate(classes)}
    for given, split_root in split_roots.items():
        for folder in _class_folders(split_root):
            _check_class_name(folder)
            if folder.name not in label_of:
                raise UserInputError(f"{folder} is a class that {root / 'train'} does not have. "
                                     f"Every split must use the classes of train/.")
    presplit = split_roots.keys() != {""}
    candidates, ignored = Candidates(), []
    paths, labels, givens = candidates.paths, candidates.labels, candidates.given
    found = collections.Counter()
    listed, last_log = 0, time.monotonic()
    for directory, names in walk(str(root)):
        parts = directory.split("/") if directory else []
        given = (parts[0] if parts else None) if presplit else None
        where = parts[1:] if presplit else parts
        in_class = (not presplit or given in split_roots) and len(where) >= 1 and \
            where[0] in label_of and not any(is_ignored(part) for part in parts)
        prefix = directory + "/" if directory else ""
        if not in_class:
            ignored.extend(prefix + name for name in names)
        else:  # columns appended directly: this loop runs once per file
            label, before = label_of[where[0]], len(paths)
            for name in names:
                dot = name.rfind(".")  # os.path.splitext's extension for a name not hidden
                if dot > 0 and name[dot:].lower() in CANDIDATE_EXTENSIONS and \
                        not is_ignored(name):
                    paths.append(prefix + name)
                    labels.append(label)
                    givens.append(given)
                else:
                    ignored.append(prefix + name)
            found[given, label] += len(paths) - before
        listed += len(names)
        if time.monotonic() - last_log > LIST_LOG_S:
            log.info("scan: listed %s files so far", f"{listed:,}")
            last_log = time.monotonic()
    for given, split_root in split_roots.items():
        for folder in _class_folders(split_root):
            if given in ("", "train") and not found[given or None, label_of[folder.name]]:
                raise UserInputError(
                    f"Class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}). "
                    f"Add images or remove the folder.")
    return candidates, ignored


def folder_candidates(root: Path) -> tuple[list[str], Candidates, list[str]]:
    """The classes and candidate images of a class-per-folder tree (or train/ val/ test/)."""
    presplit = (root / "train").is_dir()
    split_roots = {name: root / name for name in SPLITS if (root / name).is_dir()} \
        if presplit else {"": root}
    classes = [p.name for p in _class_folders(split_roots.get("train", root))]
    if len(classes) < 2:
        raise UserInputError(
            f"{split_roots.get('train', root)} has {len(classes)} class folder(s) "
            f"({', '.join(classes) or 'none'}); tlapp needs at least 2: put each class's "
            f"images in its own subfolder, or give a CSV list or --label-from.")
    log.info("scan: listing the files under %s", root)
    candidates, ignored = _find_candidates(root, split_roots, classes)
    return classes, candidates, ignored


def _check_classes(classes: list[str], where: str) -> None:
    if len(classes) < 2:
        raise UserInputError(f"{where} gives {len(classes)} label(s) "
                             f"({', '.join(map(repr, classes)) or 'none'}); tlapp needs at "
                             f"least 2.")
    for name in classes:
        bad = [ch for ch in name if unicodedata.category(ch) in LINE_BREAKING]
        if bad or "/" in name:
            raise UserInputError(f"The label {name!r} (in {where}) contains a control, "
                                 f"line-break or '/' character, which would break labels.txt. "
                                 f"Change the label.")


def named_candidates(root: Path, pattern) -> tuple[list[str], Candidates, list[str],
                                                    list[dict]]:
    """Every image under `root`, labelled by `pattern`'s first group on its relative path;
    an image it does not match is skipped with reason "no label"."""
    log.info("scan: listing the files under %s", root)
    candidates, ignored, skipped, first_seen = Candidates(), [], [], {}
    for directory, names in walk(str(root)):
        prefix = directory + "/" if directory else ""
        hidden = any(is_ignored(part) for part in directory.split("/") if part)
        for name in names:
            relative = prefix + name
            if hidden or is_ignored(name) or \
                    os.path.splitext(name)[1].lower() not in CANDIDATE_EXTENSIONS:
                ignored.append(relative)
            elif (label := sources.match(pattern, relative)) is None:
                skipped.append({"path": relative, "reason": "no label", "detail":
                                f"--label-from {pattern.pattern!r} does not match the path"})
            else:
                candidates.add(relative, first_seen.setdefault(label, len(first_seen)))
    classes = _sorted_labels(candidates, first_seen, f"--label-from {pattern.pattern!r} on "
                                                     f"{root}")
    return classes, candidates, ignored, skipped


def _sorted_labels(candidates: Candidates, first_seen: dict[str, int], where: str
                   ) -> list[str]:
    """The class names, sorted; candidates' labels (numbered in order of appearance)
    renumbered to match."""
    classes = sorted(first_seen)
    _check_classes(classes, where)
    index = {name: i for i, name in enumerate(classes)}
    order = [index[name] for name in first_seen]  # first_seen keeps insertion order
    candidates.labels = array.array("i", (order[label] for label in candidates.labels))
    if candidates.multi is not None:
        candidates.multi = [tuple(sorted(order[label] for label in labels))
                            for labels in candidates.multi]
    return classes


def list_candidates(listing: Path, path_column: str, label_column: str,
                     multi_label: bool = False) -> tuple[list[str], Candidates, list[dict]]:
    """The images a list file names. A row with no label, with several labels, or naming a
    file an earlier row named is skipped (listed with its line)."""
    candidates = Candidates(groups=[], lines=array.array("q"),
                             multi=[] if multi_label else None)
    skipped, first_line, first_seen = [], {}, {}
    for row in sources.read_list(listing, path_column, label_column):
        where = {"path": row.path, "line": row.line}
        if not row.path:
            skipped.append(where | {"reason": "no path", "detail": f"the {path_column} "
                                                                   f"column is empty"})
        elif not row.labels:
            skipped.append(where | {"reason": "no label", "detail": f"the {label_column} "
                                                                    f"column is empty"})
        elif len(row.labels) > 1 and not multi_label:
            skipped.append(where | {"reason": "several labels", "detail": (
                f"{', '.join(row.labels)}: pass --multi-label to train on several "
                f"labels per image")})
        elif (key := os.path.normpath(row.path)) in first_line:
            skipped.append(where | {"reason": "duplicate row",
                                    "detail": f"line {first_line[key]} names the same file"})
        else:
            first_line[key] = row.line
            numbers = tuple(dict.fromkeys(first_seen.setdefault(label, len(first_seen))
                                          for label in row.labels))
            candidates.add(row.path.replace(os.sep, "/"),
                           numbers if multi_label else numbers[0], row.split, row.group,
                           row.line)
    del first_line
    if not any(candidates.groups):
        candidates.groups = None
    classes = _sorted_labels(candidates, first_seen, str(listing))
    log.info("scan: %s lists %s images (%d rows skipped)", listing,
             f"{len(candidates.paths):,}", len(skipped))
    return classes, candidates, skipped
