"""Image folders: find every file, validate the images (checking.py), split them by
content hash into train/val/test (splits.py), and report what was used, skipped and ignored.

The scan streams: files are listed as plain strings (candidates.py), checked a window at a
time with the results stored as they come (checking.py), and split and counted in one pass,
so its memory is what the finished scan holds (about 350 bytes per image) and its time grows
linearly. DATA itself is resolved by inputs.py (re-exported here).
"""
from __future__ import annotations

import array
import collections
import dataclasses
import logging
import os
from pathlib import Path
from typing import Sequence

from tlapp.constants import DEFAULT_MAX_PIXELS, SPLITS
from tlapp.data import checking, sources
from tlapp.data.candidates import (Candidates, folder_candidates, list_candidates,
                                   named_candidates)
from tlapp.data.inputs import data_root, expand_inputs, resolve_data  # noqa: F401
from tlapp.data.splits import (MIN_CLASS_IMAGES, assign_splits, hash_fraction,  # noqa: F401
                               split_samples, split_warnings)
from tlapp.errors import UserInputError

log = logging.getLogger(__name__)


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
        # One pass over the samples: a few distinct (labels, split) keys, counted after.
        pairs = collections.Counter((s.labels or s.label, s.split) for s in self.samples)
        splits, labels, by_split = (collections.Counter() for _ in range(3))
        for (key, split), n in pairs.items():
            splits[split] += n
            for label in key if isinstance(key, tuple) else (key,):
                labels[label] += n
                by_split[label, split] += n
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
        classes, candidates, pre_skipped = list_candidates(listing, path_column, label_column,
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
            classes, candidates, ignored, pre_skipped = named_candidates(root, label_pattern)
        else:
            source = "folders"
            classes, candidates, ignored = folder_candidates(root)
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


def _require_each_class(usable: Sequence[int], candidates: Candidates, checks, classes) -> None:
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


def scan_summary(data: ScannedData, counts: dict | None = None) -> str:
    """`used X of Y files; skipped N: 5 truncated, 3 empty, ...; ignored M ...`
    (`counts`: data.counts(), when the caller has it)."""
    counts = counts or data.counts()
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
    log.info("scan: %s%s", scan_summary(data, counts),
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
