"""Image folders: find every file, validate the images (checking.py), split them by
content hash into train/val/test (splits.py), and report what was used, skipped and ignored.

The scan streams: files are listed as plain strings, checked a window at a time with the
results stored as they come, and split and counted in one pass, so its memory is what the
finished scan holds (about 300 bytes per image) and its time grows linearly.
"""
from __future__ import annotations

import array
import collections
import dataclasses
import glob
import logging
import os
import time
import unicodedata
from pathlib import Path
from typing import Sequence

from tlapp.constants import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, SPLITS
from tlapp.data import checking, sources
from tlapp.data.splits import (MIN_CLASS_IMAGES, assign_splits, hash_fraction,  # noqa: F401
                               split_samples, split_warnings)
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


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    path: str  # relative to the data root, with forward slashes
    label: int
    split: str
    sha256: str  # content hash: the feature cache's row key and the split key
    labels: tuple[int, ...] = ()  # multi-label: all its labels (`label` is one)


@dataclasses.dataclass
class ScannedData:
    """A validated, split image folder."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    skipped: list[dict]  # {"path", "reason" (short category), "detail"}
    ignored: list[str]  # hidden, system and non-image files
    duplicates: int = 0  # used files whose content another used file already has
    warnings: list[str] = dataclasses.field(default_factory=list)
    checked: int = 0  # contents decode-checked by this scan (the rest were known)
    options: dict = dataclasses.field(default_factory=dict)  # the scan's settings
    groups: dict | None = None  # with groups: how many groups each split holds
    source: str = "folders"  # "folders", "list" (CSV, JSON Lines) or "names" (--label-from)
    multi_label: bool = False  # samples carry every label in `labels`
    conflicts: int = 0  # contents found under more than one label
    leaks: int = 0  # contents found in more than one given split (or group)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict:
        """found = used + skipped + ignored: every file under the data folder."""
        splits = collections.Counter(s.split for s in self.samples)
        labels = collections.Counter(label for s in self.samples
                                     for label in (s.labels or (s.label,)))
        by_split = collections.Counter((label, s.split) for s in self.samples
                                       for label in (s.labels or (s.label,)))
        reasons = collections.Counter(item["reason"] for item in self.skipped)
        return {"found": len(self.samples) + len(self.skipped) + len(self.ignored),
                "used": len(self.samples), "skipped": len(self.skipped),
                "ignored": len(self.ignored)} | {name: splits[name] for name in SPLITS} | {
            "duplicates": self.duplicates, "conflicts": self.conflicts, "leaks": self.leaks,
            "skipped_by_reason": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
            "per_class": {name: labels[i] for i, name in enumerate(self.classes)},
            "per_class_split": {name: {split: by_split[i, split] for split in SPLITS}
                                for i, name in enumerate(self.classes)}} | (
            {"groups": self.groups} if self.groups is not None else {})

    def split_json(self) -> dict:
        """Paths per split (and, unless the labels are the class folders, their labels:
        `labels` holds one list per split aligned with its paths), skipped and ignored."""
        by_split = {name: [] for name in SPLITS}
        labels = {name: [] for name in SPLITS}
        for s in self.samples:
            by_split[s.split].append(s.path)
            labels[s.split].append([self.classes[i] for i in s.labels] if self.multi_label
                                   else self.classes[s.label])
        return by_split | ({"labels": labels} if self.source != "folders" else {}) | {
            "skipped": self.skipped, "ignored": self.ignored}


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def _walk(folder: str):
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


def _list_files(folder: Path) -> list[Path]:
    """Every file under `folder` (see `_walk`), as paths."""
    return [Path(folder) / directory / name for directory, names in _walk(str(folder))
            for name in names]


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_ignored(p.name))


def _check_class_name(folder: Path) -> None:
    bad = [ch for ch in folder.name if unicodedata.category(ch) in LINE_BREAKING]
    if bad:
        raise UserInputError(
            f"The class folder name {folder.name!r} (in {folder.parent}) contains a control "
            f"or line-break character ({', '.join(sorted({repr(c) for c in bad}))}), which "
            f"would break labels.txt and every file that lists one label per line. Rename "
            f"the folder.")


@dataclasses.dataclass
class _Candidates:
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
                     ) -> tuple[_Candidates, list[str]]:
    """Every file under `root`: a candidate image of a class, or ignored."""
    label_of = {name: i for i, name in enumerate(classes)}
    for given, split_root in split_roots.items():
        for folder in _class_folders(split_root):
            _check_class_name(folder)
            if folder.name not in label_of:
                raise UserInputError(f"{folder} is a class that {root / 'train'} does not have. "
                                     f"Every split must use the classes of train/.")
    presplit = split_roots.keys() != {""}
    candidates, ignored = _Candidates(), []
    found = collections.Counter()
    listed, last_log = 0, time.monotonic()
    for directory, names in _walk(str(root)):
        parts = directory.split("/") if directory else []
        given = (parts[0] if parts else None) if presplit else None
        where = parts[1:] if presplit else parts
        in_class = (not presplit or given in split_roots) and len(where) >= 1 and \
            where[0] in label_of and not any(_is_ignored(part) for part in parts)
        prefix = directory + "/" if directory else ""
        for name in names:
            relative = prefix + name
            if in_class and not _is_ignored(name) and \
                    os.path.splitext(name)[1].lower() in CANDIDATE_EXTENSIONS:
                label = label_of[where[0]]
                candidates.add(relative, label, given)
                found[given, label] += 1
            else:
                ignored.append(relative)
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


def scan_folder(root: str | os.PathLike, val_fraction: float = 0.1, test_fraction: float = 0.1,
                max_pixels: int = DEFAULT_MAX_PIXELS,
                cache_dir: str | os.PathLike | None = None, label_from: str | None = None,
                group_by: str | None = None, path_column: str = "path",
                label_column: str = "label", multi_label: bool = False) -> ScannedData:
    """Finds, validates and splits the images of a class-per-subfolder tree, of a list file,
    or of a folder whose file names hold the labels.

    `root` holds one folder per class, or `train/` (and optionally `val/`, `test/`)
    each laid out so; a split that is not given is carved out of train by content hash,
    so identical files always share a split. Images in nested folders belong to their
    top-level class folder. Check results are kept under `cache_dir` when given.

    `root` may instead be a CSV or JSON Lines file (sources.py: columns `path_column`,
    `label_column`, optionally `split` and `group`; paths relative to the file's folder),
    or, with `label_from` (a regular expression), a folder of images whose label is the
    first capture group of their relative path. `group_by` (a regular expression on the
    relative path) or a list's `group` column keeps each group in one split, chosen by a
    hash of the group's name. `multi_label`: a list file's rows may carry several labels
    (separated by ';' in a CSV cell, a list in JSON Lines); each sample keeps them all.

    Raises:
        UserInputError: missing folder, fewer than 2 classes, a class with no usable image,
            a class folder whose name holds a control character, or a malformed list file.
    """
    root = Path(root).expanduser()
    label_pattern = sources.compile_pattern(label_from, "--label-from")
    group_pattern = sources.compile_pattern(group_by, "--group-by")
    pre_skipped: list[dict] = []
    if sources.is_list_file(root):
        if label_pattern:
            raise UserInputError(f"--label-from takes labels from file names in a folder; "
                                 f"{root} gives its labels in a column (--label-column).")
        source, listing = "list", root
        root = root.parent
        classes, candidates, pre_skipped = _list_candidates(listing, path_column, label_column,
                                                            multi_label)
        ignored: list[str] = []
    else:
        if multi_label:
            raise UserInputError(f"--multi-label needs a CSV or JSON Lines DATA that lists "
                                 f"each image's labels (separated by ';' in a CSV). "
                                 f"Received: {root}")
        if root.is_file():
            raise UserInputError(
                f"{root} is a file, but DATA must be a folder with one subfolder of images "
                f"per class (or train/, val/, test/ folders laid out so), a "
                f"{' or '.join(sources.LIST_SUFFIXES)} list of images and labels, or "
                f"tfds:NAME.")
        if not root.is_dir():
            raise UserInputError(f"Data folder not found: {root}. Give a folder with one "
                                 f"subfolder of images per class, a CSV or JSON Lines list, "
                                 f"or tfds:NAME.")
        if label_pattern:
            source = "names"
            classes, candidates, ignored, pre_skipped = _named_candidates(root, label_pattern)
        else:
            source = "folders"
            classes, candidates, ignored = _folder_candidates(root)
    split_roots = {"": root} if source != "folders" or not (root / "train").is_dir() else \
        {name: root / name for name in SPLITS if (root / name).is_dir()}
    if group_pattern:
        if candidates.groups is not None and any(g is not None for g in candidates.groups):
            raise UserInputError(f"Give groups one way: {root} has a group column, and "
                                 f"--group-by was given too.")
        candidates.groups = [sources.match(group_pattern, path) for path in candidates.paths]

    log.info("scan: %s images in %d classes under %s; checking they decode",
             f"{len(candidates.paths):,}", len(classes), root)
    checks = checking.check_files(str(root), candidates.paths, max_pixels, cache_dir)
    skipped = pre_skipped + [
        {"path": candidates.paths[i], "reason": reason, "detail": detail} |
        ({"line": candidates.lines[i]} if candidates.lines is not None else {})
        for i, (reason, detail) in sorted(checks.problems.items())]
    # Columns of the usable files (array: no object per file), the others freed as soon
    # as they are used: the peak is about what the finished scan holds.
    usable = array.array("q", (i for i, digest in enumerate(checks.digests)
                               if digest is not None and i not in checks.problems))
    _require_each_class(usable, candidates, checks, classes)
    given = set(split_roots) | set(candidates.given)  # a split given anywhere is not carved
    carve = {name: 0.0 if name in given else f
             for name, f in (("val", val_fraction), ("test", test_fraction))}
    digests = checks.digests if len(usable) == len(checks.digests) else \
        [checks.digests[i] for i in usable]
    checks.digests = None
    groups = None
    if candidates.groups is not None:  # a file with no group is its own group
        groups = [candidates.groups[i] if candidates.groups[i] is not None
                  else "\0" + digests[k] for k, i in enumerate(usable)]
        candidates.groups = None
    labels = array.array("i", (candidates.labels[i] for i in usable))
    candidates.labels = None
    splits, report = split_samples(digests, labels, [candidates.given[i] for i in usable],
                                   len(classes), carve, groups)
    candidates.given = groups = None
    multi = candidates.multi
    if multi is not None:  # every label of an image counts for it
        report["per_class"] = collections.Counter(label for i in usable for label in multi[i])
    paths = candidates.paths
    samples = [Sample(paths[i], labels[k], splits[k], digests[k],
                      multi[i] if multi is not None else ())
               for k, i in enumerate(usable)]
    del paths, digests, labels, splits, usable
    candidates.paths = candidates.multi = None
    data = ScannedData(root, classes, samples, skipped, ignored, report["duplicates"],
                       split_warnings(report, classes), checks.checked, {
                           "val_fraction": val_fraction, "test_fraction": test_fraction,
                           "max_pixels": max_pixels} | (
                           {"label_from": label_from} if label_from else {}) | (
                           {"group_by": group_by} if group_by else {}),
                       report.get("groups"), source, multi_label, report["conflicts"],
                       report["leaks"])
    report_scan(data)
    return data


def _folder_candidates(root: Path) -> tuple[list[str], _Candidates, list[str]]:
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


def _named_candidates(root: Path, pattern) -> tuple[list[str], _Candidates, list[str],
                                                    list[dict]]:
    """Every image under `root`, labelled by `pattern`'s first group on its relative path;
    an image it does not match is skipped with reason "no label"."""
    log.info("scan: listing the files under %s", root)
    candidates, ignored, skipped, first_seen = _Candidates(), [], [], {}
    for directory, names in _walk(str(root)):
        prefix = directory + "/" if directory else ""
        hidden = any(_is_ignored(part) for part in directory.split("/") if part)
        for name in names:
            relative = prefix + name
            if hidden or _is_ignored(name) or \
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


def _sorted_labels(candidates: _Candidates, first_seen: dict[str, int], where: str
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


def _list_candidates(listing: Path, path_column: str, label_column: str,
                     multi_label: bool = False) -> tuple[list[str], _Candidates, list[dict]]:
    """The images a list file names. A row with no label, with several labels, or naming a
    file an earlier row named is skipped (listed with its line)."""
    candidates = _Candidates(groups=[], lines=array.array("q"),
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


def _require_each_class(usable: Sequence[int], candidates: _Candidates, checks, classes) -> None:
    multi = candidates.multi

    def labels_of(i: int) -> tuple:
        return multi[i] if multi is not None else (candidates.labels[i],)

    per_class = collections.Counter(label for i in usable for label in labels_of(i))
    for label, name in enumerate(classes):
        if not per_class[label]:
            mine = [f"{candidates.paths[i]} ({checks.problems[i][0]})"
                    for i in range(len(candidates.paths))
                    if label in labels_of(i) and i in checks.problems][:3]
            raise UserInputError(f"Class '{name}' has no image that decodes: "
                                 f"{', '.join(mine)}. Fix or remove the folder.")


def scan_summary(data: ScannedData) -> str:
    """`used X of Y files; skipped N: 5 truncated, 3 empty, ...; ignored M ...`."""
    counts = data.counts()
    line = f"used {counts['used']:,} of {counts['found']:,} files"
    if data.skipped:
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in counts["skipped_by_reason"].items())
        line += f"; skipped {counts['skipped']:,}: {reasons}"
    if data.ignored:
        line += f"; ignored {counts['ignored']:,} hidden, system or non-image files"
    return line


def report_scan(data: ScannedData) -> None:
    """One summary of what was found, used, skipped and ignored, the classes and warnings."""
    counts = data.counts()
    log.info("scan: %s%s", scan_summary(data),
             " (all listed in split.json)" if data.skipped else "")
    sizes = counts["per_class"]
    ratio = max(sizes.values()) / max(1, min(sizes.values()))
    log.info("scan: classes %s%s", ", ".join(f"{name} {n:,}" for name, n in sizes.items()),
             f" (largest/smallest {ratio:.1f}x; consider --class-weight auto)"
             if ratio >= 3 else "")
    log.info("scan: split train %s, val %s, test %s%s", f"{counts['train']:,}",
             f"{counts['val']:,}", f"{counts['test']:,}",
             f"; {data.duplicates:,} duplicate files, each kept in the split of its copies"
             if data.duplicates else "")
    for warning in data.warnings:
        log.warning("scan: warning: %s", warning)


def expand_inputs(items: list[str]) -> list[str]:
    """Files as given, folders as the images under them, globs as their matches, list
    files (CSV, JSON Lines with a `path` column) as the images they name, in order.

    An item that yields nothing (a missing file, a glob that matches nothing, a folder with
    no images) is kept as it is, so the caller reports it rather than dropping it silently.
    """
    paths = []
    for item in items:
        path = Path(item).expanduser()
        if sources.is_list_file(path):  # a CSV or JSON Lines list: the images it names
            found = [os.path.join(path.parent, row.path) for row in
                     sources.read_list(path, labels=False) if row.path]
        elif path.is_dir():
            found = [str(f) for f in _list_files(path) if not _is_ignored(f.name)
                     and f.suffix.lower() in IMAGE_EXTENSIONS]
        elif not path.exists() and glob.has_magic(item):
            found = sorted(glob.glob(os.path.expanduser(item), recursive=True))
        else:
            found = []
        paths += found or [str(path)]
    return paths


def data_root(data: Path) -> Path:
    """The folder image paths of DATA are relative to: a list file's folder, else DATA."""
    return data.parent if sources.is_list_file(data) else data


def resolve_data(data: str, cache_dir: Path) -> Path:
    """The image folder for DATA: the folder itself, or a TFDS dataset written out as one."""
    if data.startswith("tfds:"):
        from tlapp.data import tfds  # TensorFlow Datasets is slow to import: only for tfds:

        return tfds.materialize_tfds(data[len("tfds:"):], Path(cache_dir) / "tfds")
    return Path(data).expanduser()
