"""Image folders: find every file, validate the images (see validation.py), split them by
content hash into train/val/test, and report what was used, skipped and ignored."""
from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import logging
import os
from pathlib import Path

from tlapp.constants import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, SPLITS
from tlapp.data import validation
from tlapp.errors import UserInputError

log = logging.getLogger(__name__)

# Images tlapp does not read: checked anyway (a PNG named .tif is used), else skipped with
# reason "unsupported format" so that they are listed rather than silently ignored.
OTHER_IMAGE_EXTENSIONS = (".tif", ".tiff", ".heic", ".heif", ".avif", ".jp2", ".j2k", ".jxl",
                          ".ico", ".icns", ".psd", ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
                          ".dds", ".pcx", ".svg", ".dng", ".cr2", ".nef", ".arw")
SYSTEM_NAMES = ("thumbs.db", "desktop.ini", "__macosx")  # plus every name starting with "."
MIN_CLASS_IMAGES = 3  # fewer cannot fill train, val and test


@dataclasses.dataclass(frozen=True)
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

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict:
        """found = used + skipped + ignored: every file under the data folder."""
        counts = {"found": len(self.samples) + len(self.skipped) + len(self.ignored),
                  "used": len(self.samples), "skipped": len(self.skipped),
                  "ignored": len(self.ignored)}
        counts |= {name: len(self.split(name)) for name in SPLITS}
        reasons = collections.Counter(item["reason"] for item in self.skipped)
        return counts | {"duplicates": self.duplicates,
                         "skipped_by_reason": dict(sorted(reasons.items(),
                                                          key=lambda kv: (-kv[1], kv[0]))),
                         "per_class": {name: sum(s.label == i for s in self.samples)
                                       for i, name in enumerate(self.classes)}}

    def split_json(self) -> dict:
        return {name: [s.path for s in self.split(name)] for name in SPLITS} | {
            "skipped": self.skipped, "ignored": self.ignored}


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def _list_files(folder: Path) -> list[Path]:
    """Every file under `folder`, following symlinks; a folder reached twice (a symlink
    loop, or two links to one place) is listed once."""
    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        files += [Path(dirpath) / name for name in sorted(filenames)]
    return files


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_ignored(p.name))


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a string: a file's split never depends on other files."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16) / 16**15


def assign_splits(keys: list[str], val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Stable hash split of one class's files (keyed by content hash, or any string), with
    at least one val and one test file whenever the class has 3 or more.

    A key's split depends only on itself, except in a class the hash left without a train,
    val or test file: there one key is moved from a split that can spare one (train first,
    lowest hash first). Adding keys to a class that needed no filling moves nothing.
    """
    paths = list(dict.fromkeys(keys))
    u = {p: hash_fraction(p) for p in paths}
    split = {p: "test" if u[p] < test_fraction else
             "val" if u[p] < test_fraction + val_fraction else "train" for p in paths}
    if len(paths) >= 3:
        by_u = sorted(paths, key=u.get)
        wanted = ["train"] + [name for name, f in (("test", test_fraction),
                                                   ("val", val_fraction)) if f > 0]
        for target in wanted:
            counts = {name: list(split.values()).count(name) for name in SPLITS}
            if counts[target] == 0:  # take a file from a split that can spare one, train first
                donors = [p for p in by_u if counts[split[p]] > 1]
                donor = next((p for p in donors if split[p] == "train"), donors[0])
                split[donor] = target
    return split


@dataclasses.dataclass(frozen=True)
class _Candidate:
    path: str
    label: int
    given: str | None  # the split folder it is in (presplit layout), else None


def _find_candidates(root: Path, split_roots: dict[str, Path], classes: list[str]
                     ) -> tuple[list[_Candidate], list[str]]:
    """Every file under `root`: a candidate image of a class, or ignored."""
    known = set(classes)
    for given, split_root in split_roots.items():
        for folder in _class_folders(split_root):
            if folder.name not in known:
                raise UserInputError(f"{folder} is a class that {root / 'train'} does not have. "
                                     f"Every split must use the classes of train/.")
    candidates, ignored = [], []
    for file in _list_files(root):
        relative = file.relative_to(root).as_posix()
        parts = relative.split("/")
        given = parts[0] if split_roots.keys() != {""} else None
        where = parts[1:] if given else parts
        usable = (given is None or given in split_roots) and len(where) >= 2 and \
            where[0] in known and not any(_is_ignored(part) for part in parts) and \
            file.suffix.lower() in IMAGE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS
        if usable:
            candidates.append(_Candidate(relative, classes.index(where[0]), given))
        else:
            ignored.append(relative)
    found = collections.Counter((c.given, c.label) for c in candidates)
    for given, split_root in split_roots.items():
        for folder in _class_folders(split_root):
            if given in ("", "train") and not found[given or None, classes.index(folder.name)]:
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
    top-level class folder. Check results are cached under `cache_dir` when given.

    Raises:
        UserInputError: missing folder, fewer than 2 classes, or a class with no usable image.
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
    candidates, ignored = _find_candidates(root, split_roots, classes)

    log.info("scan: %s images in %d classes under %s; checking they decode",
             f"{len(candidates):,}", len(classes), root)
    checks = validation.check_files([root / c.path for c in candidates], max_pixels, cache_dir)
    skipped = [{"path": c.path, "reason": r["reason"], "detail": r["detail"]}
               for c, r in zip(candidates, checks) if r["reason"]]
    usable = [(c, r["sha256"]) for c, r in zip(candidates, checks) if not r["reason"]]
    for label, name in enumerate(classes):
        if not any(c.label == label for c, _ in usable):
            mine = [f"{c.path} ({r['reason']})" for c, r in zip(candidates, checks)
                    if c.label == label][:3]
            raise UserInputError(f"Class '{name}' has no image that decodes: "
                                 f"{', '.join(mine)}. Fix or remove the folder.")
    data = ScannedData(root, classes, [], skipped, ignored)
    data.samples = _split_samples(usable, classes, split_roots, val_fraction, test_fraction,
                                  data)
    report_scan(data)
    return data


def _split_samples(usable: list[tuple[_Candidate, str]], classes: list[str],
                   split_roots: dict, val_fraction: float, test_fraction: float,
                   data: ScannedData) -> list[Sample]:
    """Assigns splits by content hash, so identical files share one split (across classes:
    the first class's). Given val/ and test/ folders are used as they are; copies between
    given splits are only reported. Notes duplicates and warnings on `data`."""
    fractions = {name: 0.0 if name in split_roots else f
                 for name, f in (("val", val_fraction), ("test", test_fraction))}
    chosen, split_of = {}, {}
    for label in range(len(classes)):
        mine = [(c, d) for c, d in usable if c.label == label and c.given in (None, "train")]
        assigned = assign_splits([d for _, d in mine], fractions["val"], fractions["test"])
        for c, digest in mine:
            split_of[c.path] = chosen.setdefault(digest, assigned[digest])
    samples = [Sample(c.path, c.label, split_of.get(c.path, c.given), d) for c, d in usable]

    data.duplicates = len(samples) - len({s.sha256 for s in samples})
    labels, given = collections.defaultdict(set), collections.defaultdict(set)
    for c, digest in usable:
        labels[digest].add(c.label)
        given[digest].add(c.given)
    conflicts = sum(len(v) > 1 for v in labels.values())
    if conflicts:
        data.warnings.append(f"{conflicts} image(s) appear with identical content in more than "
                             f"one class folder: their labels conflict")
    leaks = sum(len(v - {None}) > 1 for v in given.values())
    if leaks:
        data.warnings.append(f"{leaks} image(s) appear in more than one of the given train/, "
                             f"val/ and test/ folders: the splits overlap (kept as given)")
    for label, name in enumerate(classes):
        count = sum(s.label == label for s in samples)
        if count < MIN_CLASS_IMAGES:
            data.warnings.append(f"class '{name}' has only {count} usable image(s): it cannot "
                                 f"appear in train, val and test; add at least "
                                 f"{MIN_CLASS_IMAGES - count} more")
    return samples


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
