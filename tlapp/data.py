"""Image folders: scan, decode-validation, stable hash split, tf.data readers, TFDS source."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import hashlib
import os
import shutil
from pathlib import Path

import keras
import tensorflow as tf

from tlapp.config import UserInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Sample:
    path: str  # relative to the data root, with forward slashes
    label: int
    split: str
    sha256: str  # content hash: the feature cache's row key


@dataclasses.dataclass
class ScannedData:
    """A validated, split image folder."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    skipped: list[dict]  # {"path": relative path, "reason": why it was not used}
    ignored: list[str]  # hidden, system and non-image files

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, int]:
        counts = {"found": len(self.samples) + len(self.skipped), "used": len(self.samples),
                  "skipped": len(self.skipped), "ignored": len(self.ignored)}
        return counts | {name: len(self.split(name)) for name in SPLITS}

    def split_json(self) -> dict:
        return {name: [s.path for s in self.split(name)] for name in SPLITS} | {
            "skipped": self.skipped}


def decode_image(data: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded file bytes -> float32 RGB pixels in [0, 255], resized to a square.

    The training pipeline, `tlapp predict` and the exported SavedModel all call this,
    so they see identical pixels.
    """
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    return tf.ensure_shape(image, [image_size, image_size, 3])


def image_dataset(paths: list[str], image_size: int, batch_size: int) -> tf.data.Dataset:
    """Batches of decoded, resized pixels, read and decoded in parallel and prefetched."""
    return (
        tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
        .map(lambda p: decode_image(tf.io.read_file(p), image_size),
             num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in ("thumbs.db", "desktop.ini")


def _list_files(folder: Path) -> list[Path]:
    """Every file under `folder`, following symlinks without looping."""
    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _is_ignored(d))
        files += [Path(dirpath) / name for name in sorted(filenames)]
    return files


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_ignored(p.name))


def check_image(path: Path) -> tuple[str | None, str | None]:
    """Decodes one file with the decoder training uses. Returns (sha256, None) or (None, reason)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}"
    if not data:
        return None, "empty file"
    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        return None, f"cannot decode: {e.message.splitlines()[0]}"
    if min(image.shape[:2]) < 1:
        return None, "image has no pixels"
    return hashlib.sha256(data).hexdigest(), None


def check_images(paths: list[Path], verbose: bool = True) -> list[tuple[str | None, str | None]]:
    """`check_image` over many files in parallel threads (TF's decoders release the GIL)."""
    results = []
    bar = keras.utils.Progbar(len(paths), unit_name="image") if verbose and paths else None
    with concurrent.futures.ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        for result in pool.map(check_image, paths):
            results.append(result)
            if bar and (len(results) % 64 == 0 or len(results) == len(paths)):
                bar.update(len(results))
    return results


def hash_fraction(relative_path: str) -> float:
    """A stable number in [0, 1) from a file's relative path: its split never depends on other files."""
    return int(hashlib.sha256(relative_path.encode()).hexdigest()[:15], 16) / 16**15


def assign_splits(paths: list[str], val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Stable hash split of one class's files, with at least one val and one test file
    whenever the class has 3 or more files.

    A file's split depends only on its own path, except in a class the hash left without a
    train, val or test file: there one file is moved from a split that can spare one (train
    first, lowest hash first). Adding files to a class that needed no filling moves nothing.
    """
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


def scan_folder(root: str | os.PathLike, val_fraction: float = 0.1, test_fraction: float = 0.1,
                verbose: bool = True) -> ScannedData:
    """Finds, validates and splits the images of a class-per-subfolder tree.

    `root` holds one folder per class, or `train/` (and optionally `val/`, `test/`)
    each laid out so; a split that is not given is carved out of train by hash.

    Raises:
        UserInputError: missing folder, fewer than 2 classes, or a class with no usable image.
    """
    root = Path(root).expanduser()
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

    candidates, ignored = [], []  # candidates: (relative path, label, given split)
    for given, split_root in split_roots.items():
        for folder in _class_folders(split_root):
            if folder.name not in classes:
                raise UserInputError(f"{folder} is a class that {root / 'train'} does not have. "
                                     f"Every split must use the classes of train/.")
            label = classes.index(folder.name)
            found = 0
            for file in _list_files(folder):
                relative = file.relative_to(root).as_posix()
                if _is_ignored(file.name) or file.suffix.lower() not in IMAGE_EXTENSIONS:
                    ignored.append(relative)
                else:
                    candidates.append((relative, label, given or None))
                    found += 1
            if found == 0 and given in ("", "train"):
                raise UserInputError(f"Class folder {folder} holds no images "
                                     f"({', '.join(IMAGE_EXTENSIONS)}). Add images or remove it.")
        for file in split_root.iterdir():
            if file.is_file():
                ignored.append(file.relative_to(root).as_posix())

    if verbose:
        print(f"scan: {len(candidates)} images in {len(classes)} classes under {root}; "
              f"checking they decode")
    checks = check_images([root / c[0] for c in candidates], verbose=verbose)
    skipped = [{"path": c[0], "reason": reason} for c, (_, reason) in zip(candidates, checks)
               if reason]
    usable = [(c, digest) for c, (digest, _) in zip(candidates, checks) if digest]

    fractions = {"val": val_fraction, "test": test_fraction}
    samples = []
    for label, name in enumerate(classes):
        mine = [(c, d) for c, d in usable if c[1] == label]
        if not mine:
            raise UserInputError(f"Class '{name}' has no image that decodes; see the skipped "
                                 f"files above. Fix or remove the folder.")
        to_split = [c[0] for c, _ in mine if c[2] in (None, "train")]
        assigned = assign_splits(to_split, *(0 if s in split_roots else fractions[s]
                                             for s in ("val", "test")))
        samples += [Sample(c[0], label, c[2] if c[2] not in (None, "train") else assigned[c[0]], d)
                    for c, d in mine]
    data = ScannedData(root, classes, samples, skipped, ignored)
    if verbose:
        report_scan(data)
    return data


def report_scan(data: ScannedData) -> None:
    """One summary of what was found, used, skipped and ignored."""
    counts = data.counts()
    per_class = ", ".join(f"{name} {sum(s.label == i for s in data.samples)}"
                          for i, name in enumerate(data.classes))
    print(f"scan: {counts['used']} images used (train {counts['train']}, val {counts['val']}, "
          f"test {counts['test']}); per class: {per_class}")
    if data.ignored:
        print(f"scan: ignored {len(data.ignored)} non-image or hidden files")
    if data.skipped:
        print(f"scan: skipped {len(data.skipped)} files that cannot be used:")
        for item in data.skipped[:10]:
            print(f"  {item['path']}: {item['reason']}")
        if len(data.skipped) > 10:
            print(f"  ... and {len(data.skipped) - 10} more (all listed in split.json)")


def expand_inputs(items: list[str]) -> list[str]:
    """Files as given, folders as the images under them, globs as their matches, in order.

    A path that matches nothing is kept, so the caller reports it as unreadable.
    """
    paths = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            paths += [str(f) for f in _list_files(path) if not _is_ignored(f.name)
                      and f.suffix.lower() in IMAGE_EXTENSIONS]
        elif not path.exists() and glob.has_magic(item):
            paths += sorted(glob.glob(os.path.expanduser(item), recursive=True))
        else:
            paths.append(str(path))
    return paths


def resolve_data(data: str, cache_dir: Path, verbose: bool = True) -> Path:
    """The image folder for DATA: the folder itself, or a TFDS dataset written out as one."""
    if data.startswith("tfds:"):
        return materialize_tfds(data[len("tfds:"):], Path(cache_dir) / "tfds", verbose)
    return Path(data).expanduser()


def materialize_tfds(name: str, root: Path, verbose: bool = True) -> Path:
    """Writes a TFDS image-classification dataset once as PNG files in train/val/test folders.

    The folder is then scanned, split and cached like any user folder, so every other step
    has one code path. Written to a temporary folder and renamed when complete.
    """
    import tensorflow_datasets as tfds  # imported here: slow, and only needed for tfds:

    folder = root / name.replace("/", "_").replace(":", "_")
    if folder.is_dir():
        return folder
    try:
        builder = tfds.builder(name)
        builder.download_and_prepare()
    except Exception as e:  # unknown name, no network, ...
        raise UserInputError(f"Could not load TFDS dataset '{name}': {str(e).splitlines()[0]} "
                             f"Check the name (tfds.list_builders()) and the network, or use a "
                             f"local image folder.") from None
    info = builder.info
    if "image" not in info.features or "label" not in info.features:
        raise UserInputError(f"TFDS dataset '{name}' has no 'image' and 'label' features; "
                             f"tlapp reads image classification datasets.")
    classes = info.features["label"].names
    width = len(str(len(classes) - 1))
    class_names = [f"{i:0{width}d}_{c}".replace("/", "_") for i, c in enumerate(classes)]
    temp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(temp, ignore_errors=True)
    written = 0
    for split in list(info.splits) or ["train", "validation", "test"]:
        target = {"validation": "val"}.get(split, split)
        if target not in SPLITS:
            continue
        try:
            dataset = builder.as_dataset(split=split)
        except (ValueError, KeyError):  # the dataset has no such split
            continue
        for name_ in class_names:
            (temp / target / name_).mkdir(parents=True, exist_ok=True)
        if verbose:
            print(f"tfds: writing {name} {split} as PNG files under {folder}")
        for i, example in enumerate(dataset):
            png = tf.io.encode_png(example["image"]).numpy()
            label = int(example["label"])
            (temp / target / class_names[label] / f"{i:07d}.png").write_bytes(png)
            written += 1
    if not (temp / "train").is_dir() or not written:
        raise UserInputError(f"TFDS dataset '{name}' has no 'train' split with images.")
    temp.rename(folder)
    return folder
