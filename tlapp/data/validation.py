"""Decode-validation of image files, in parallel, with results cached by content hash.

Every file is decoded once with the decoder training uses (`decoding.decode_image`): only a
real decode catches a truncated JPEG. A file that fails gets a short reason (the category
counted in the scan summary) and a detail.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import time
import warnings
from pathlib import Path

import tensorflow as tf

from tlapp.constants import DEFAULT_MAX_PIXELS
from tlapp.data.decoding import (DECODER_VERSION, decode_file_bytes, describe_error,
                                 image_shape, sniff_format)
from tlapp.files import disk_full, is_disk_full, write_atomic
from tlapp.progress import Progress

VALIDATION_SIZE = 64  # decoded at this size when checking: the full decode still runs


def _record(reason: str | None, detail: str = "", height: int = 0, width: int = 0) -> dict:
    return {"reason": reason, "detail": detail, "height": height, "width": width}


def _looks_truncated(data: bytes, kind: str) -> bool:
    """The format's end marker or declared length is missing."""
    tail = data.rstrip(b"\0")
    if kind == "jpeg":
        return not tail.endswith(b"\xff\xd9")
    if kind == "png":
        return b"IEND" not in data[-16:]
    if kind == "gif":
        return not tail.endswith(b";")
    declared = int.from_bytes(data[4:8] if kind == "webp" else data[2:6], "little")
    return declared + (8 if kind == "webp" else 0) > len(data)


def _explain_failure(data: bytes, kind: str, error: Exception) -> dict:
    """Why TensorFlow could not decode a file whose header says it is `kind`."""
    from PIL import Image

    detail = describe_error(error)
    if _looks_truncated(data, kind):
        return _record("truncated", f"the {kind.upper()} data ends early ({detail})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(data)).load()
    except Exception as e:  # Pillow cannot read it either
        return _record("truncated" if "truncated" in str(e) else "corrupt", detail)
    return _record("unsupported format", f"a {kind.upper()} variant TensorFlow does not "
                                         f"decode ({detail}); convert it to PNG or JPEG")


def _identify(data: bytes) -> dict:
    """A file that is not JPEG, PNG, GIF, BMP or WebP: another image format, or not an image."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kind = Image.open(io.BytesIO(data)).format
    except Image.DecompressionBombError:
        kind = "a very large"
    except Exception:
        return _record("not an image", "the content is not a JPEG, PNG, GIF, BMP or WebP image")
    return _record("unsupported format",
                   f"{kind} images are not read; convert them to PNG or JPEG")


def check_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Decodes one file's bytes with the decoder training uses (unless its header declares
    more than `max_pixels`).

    Returns:
        {"reason": None or a short category ("empty", "not an image", "unsupported format",
        "truncated", "corrupt", "too large"), "detail": text, "height", "width"}.
    """
    if not data:
        return _record("empty", "the file has 0 bytes")
    kind = sniff_format(data)
    if kind is None:
        return _identify(data)
    try:
        height, width = image_shape(data)
        if height * width > max_pixels:
            return _record("too large", "", height, width)
        decode_file_bytes(data, VALIDATION_SIZE, None)
    except tf.errors.InvalidArgumentError as e:
        return _explain_failure(data, kind, e)
    return _record(None, "", height, width)


def _verdict(record: dict, max_pixels: int) -> dict | None:
    """A stored check result under the current pixel limit; None if it must be checked again
    (it was too large for an earlier, lower limit and so was never decoded)."""
    height, width = record["height"], record["width"]
    if height * width > max_pixels:
        return _record("too large", f"{width}x{height} is {height * width / 1e6:.0f} "
                                    f"megapixels, over the limit of {max_pixels / 1e6:g} "
                                    f"(--max-pixels)", height, width)
    return None if record["reason"] == "too large" else record


class ValidationCache:
    """Check results keyed by content hash (and the hash of each path keyed by its size and
    mtime), in one JSON file under the cache folder, so an unchanged folder is never read
    or decoded twice. Keyed by DECODER_VERSION: a new decoder checks everything again."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.path = Path(cache_dir).expanduser() / "scan" / f"validation-{DECODER_VERSION}.json"
        self.files, self.results = self._load()

    def _load(self) -> tuple[dict, dict]:
        try:
            stored = json.loads(self.path.read_text())
            return stored["files"], stored["results"]
        except (OSError, ValueError, KeyError):
            return {}, {}

    def digest(self, path: Path, stat: os.stat_result) -> str | None:
        """The content hash recorded for this path, if the file has not changed since."""
        entry = self.files.get(os.path.abspath(path))
        # A file modified in the same clock tick as it was hashed may have changed unseen.
        if entry and entry[:2] == [stat.st_size, stat.st_mtime_ns] and \
                stat.st_mtime_ns < entry[3] - 2_000_000_000:
            return entry[2]
        return None

    def save(self) -> None:
        files, results = self._load()  # merge with scans that finished meanwhile
        value = {"files": files | self.files, "results": results | self.results}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, lambda p: p.write_text(
                json.dumps(value, separators=(",", ":"))))
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(self.path.parent, "the scan's check results", (
                    "Nothing stored before was changed. Free some space, or pass --cache-dir "
                    "on another disk.")) from None
            raise


def check_files(paths: list[Path], max_pixels: int = DEFAULT_MAX_PIXELS,
                cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """`check_image` over many files in parallel threads (TF's decoders release the GIL),
    with results cached by content hash under `cache_dir` (when given).

    Returns:
        One dict per path: {"sha256" (None if unreadable), "reason", "detail", ...}.
    """
    store = ValidationCache(cache_dir) if cache_dir else None
    started = time.time_ns()

    def inspect(path: Path) -> dict:
        try:
            stat = path.stat()
            digest = store.digest(path, stat) if store else None
            stored = store.results.get(digest) if digest else None
            if stored is None or _verdict(stored, max_pixels) is None:
                data = path.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                if store:
                    store.files[os.path.abspath(path)] = [stat.st_size, stat.st_mtime_ns,
                                                          digest, started]
                stored = store.results.get(digest) if store else None
                if stored is None or _verdict(stored, max_pixels) is None:
                    stored = check_image(data, max_pixels)
                    if store:
                        store.results[digest] = stored
        except OSError as e:
            return {"sha256": None} | _record("unreadable", e.strerror or str(e))
        return {"sha256": digest} | _verdict(stored, max_pixels)

    results = []
    progress = Progress(len(paths), "file", "scan")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        for result in pool.map(inspect, paths):
            results.append(result)
            progress.update(len(results))
    if store:
        store.save()
    return results


