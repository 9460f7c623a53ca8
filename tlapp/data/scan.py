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

from tlapp.constants import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, SPLITS
from tlapp.data import checking
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

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict:
        """found = used + skipped + ignored: every file under the data folder."""
        splits = collections.Counter(s.split for s in self.samples)
        labels = collections.Counter(s.label for s in self.samples)
        reasons = collections.Counter(item["reason"] for item in self.skipped)
        return {"found": len(self.samples) + len(self.skipped) + len(self.ignored),
                "used": len(self.samples), "skipped": len(self.skipped),
                "ignored": len(self.ignored)} | {name: splits[name] for name in SPLITS} | {
            "duplicates": self.duplicates,
            "skipped_by_reason": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
            "per_class": {name: labels[i] for i, name in enumerate(self.classes)}}

    def split_json(self) -> dict:
        by_split = {name: [] for name in SPLITS}
        for s in self.samples:
            by_split[s.split].append(s.path)
        return by_split | {"skipped": self.skipped, "ignored": self.ignored}


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
                candidates.paths.append(relative)
                candidates.labels.append(label)
                candidates.given.append(given)
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
                cache_dir: str | os.PathLike | None = None) -> ScannedData:
    """Finds, validates and splits the images of a class-per-subfolder tree.

    `root` holds one folder per class, or `train/` (and optionally `val/`, `test/`)
    each laid out so; a split that is not given is carved out of train by content hash,
    so identical files always share a split. Images in nested folders belong to their
    top-level class folder. Check results are kept under `cache_dir` when given.

    Raises:
        UserInputError: missing folder, fewer than 2 classes, a class with no usable image,
            or a class folder whose name holds a control character.
    """
    root = Path(root).expanduser()
    if root.is_file():
        raise UserInputError(f"{root} is a file, but DATA must be a folder with one subfolder "
                             f"of images per class (or train/, val/, test/ folders laid out "
                             f"so), or tfds:NAME.")
    if not root.is_dir():
        raise UserInputError(f"Data folder not found: {root}. Give a folder with one "
                             f"subfolder of images per class, or tfds:NAME.")
    presplit = (root / "train").is_dir()
    split_roots = {name: root / name for name in SPLITS if (root / name).is_dir()} \
        if presplit else {"": root}
    classes = [p.name for p in _class_folders(split_roots.get("train", root))]
    if len(classes) < 2:
        raise UserInputError(
            f"{split_roots.get('train', root)} has {len(classes)} class folder(s) "
            f"({', '.join(classes) or 'none'}); tlapp needs at least 2: put each class's "
            f"images in its own subfolder.")
    log.info("scan: listing the files under %s", root)
    candidates, ignored = _find_candidates(root, split_roots, classes)

    log.info("scan: %s images in %d classes under %s; checking they decode",
             f"{len(candidates.paths):,}", len(classes), root)
    checks = checking.check_files(str(root), candidates.paths, max_pixels, cache_dir)
    skipped = [{"path": candidates.paths[i], "reason": reason, "detail": detail}
               for i, (reason, detail) in sorted(checks.problems.items())]
    usable = [i for i, digest in enumerate(checks.digests)
              if digest is not None and i not in checks.problems]
    _require_each_class(usable, candidates, checks, classes)
    carve = {name: 0.0 if name in split_roots else f
             for name, f in (("val", val_fraction), ("test", test_fraction))}
    splits, report = split_samples([checks.digests[i] for i in usable],
                                   [candidates.labels[i] for i in usable],
                                   [candidates.given[i] for i in usable], len(classes), carve)
    samples = [Sample(candidates.paths[i], candidates.labels[i], split, checks.digests[i])
               for i, split in zip(usable, splits)]
    data = ScannedData(root, classes, samples, skipped, ignored, report["duplicates"],
                       split_warnings(report, classes), checks.checked, {
                           "val_fraction": val_fraction, "test_fraction": test_fraction,
                           "max_pixels": max_pixels})
    report_scan(data)
    return data


def _require_each_class(usable: list[int], candidates: _Candidates, checks, classes) -> None:
    per_class = collections.Counter(candidates.labels[i] for i in usable)
    for label, name in enumerate(classes):
        if not per_class[label]:
            mine = [f"{candidates.paths[i]} ({checks.problems[i][0]})"
                    for i in range(len(candidates.paths))
                    if candidates.labels[i] == label and i in checks.problems][:3]
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
    """Files as given, folders as the images under them, globs as their matches, in order.

    An item that yields nothing (a missing file, a glob that matches nothing, a folder with
    no images) is kept as it is, so the caller reports it rather than dropping it silently.
    """
    paths = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = [str(f) for f in _list_files(path) if not _is_ignored(f.name)
                     and f.suffix.lower() in IMAGE_EXTENSIONS]
        elif not path.exists() and glob.has_magic(item):
            found = sorted(glob.glob(os.path.expanduser(item), recursive=True))
        else:
            found = []
        paths += found or [str(path)]
    return paths


def resolve_data(data: str, cache_dir: Path) -> Path:
    """The image folder for DATA: the folder itself, or a TFDS dataset written out as one."""
    if data.startswith("tfds:"):
        from tlapp.data import tfds  # TensorFlow Datasets is slow to import: only for tfds:

        return tfds.materialize_tfds(data[len("tfds:"):], Path(cache_dir) / "tfds")
    return Path(data).expanduser()
