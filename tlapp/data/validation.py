"""Decode-validation of one image file's bytes, and the verdict under a pixel limit.

Every file is decoded once with the decoder training uses (`decoding.decode_image`): only a
real decode catches a truncated JPEG. A file that fails gets a short reason (the category
counted in the scan summary) and a detail. checking.py runs the same check over a whole
folder in one tf.data pipeline and comes here for the files that fail it.
"""
from __future__ import annotations

import functools
import io
import warnings

import tensorflow as tf

from tlapp.constants import DEFAULT_MAX_PIXELS
from tlapp.data.decoding import (decode_file_bytes, describe_error, image_shape, raw_pixels,
                                 sniff_format)

VALIDATION_SIZE = 64  # decoded at this size when checking: the full decode still runs


def record(reason: str | None, detail: str = "", height: int = 0, width: int = 0) -> dict:
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
        return record("truncated", f"the {kind.upper()} data ends early ({detail})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(data)).load()
    except Exception as e:  # Pillow cannot read it either
        return record("truncated" if "truncated" in str(e) else "corrupt", detail)
    return record("unsupported format", f"a {kind.upper()} variant TensorFlow does not "
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
        return record("not an image", "the content is not a JPEG, PNG, GIF, BMP or WebP image")
    return record("unsupported format",
                   f"{kind} images are not read; convert them to PNG or JPEG")


def check_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Decodes one file's bytes with the decoder training uses (unless its header declares
    more than `max_pixels`).

    Returns:
        {"reason": None or a short category ("empty", "not an image", "unsupported format",
        "truncated", "corrupt", "too large"), "detail": text, "height", "width"}.
    """
    early = precheck(data)
    if early is not None:
        return early
    kind = sniff_format(data)
    try:
        height, width = image_shape(data)
        if height * width > max_pixels:
            return record("too large", "", height, width)
        decode_file_bytes(data, VALIDATION_SIZE, None)
    except tf.errors.InvalidArgumentError as e:
        return _explain_failure(data, kind, e)
    return record(None, "", height, width)


def verdict(stored: dict, max_pixels: int) -> dict | None:
    """A stored check result under the current pixel limit; None if it must be checked again
    (it was too large for an earlier, lower limit and so was never decoded)."""
    height, width = stored["height"], stored["width"]
    if height * width > max_pixels:
        return record("too large", f"{width}x{height} is {height * width / 1e6:.0f} "
                                   f"megapixels, over the limit of {max_pixels / 1e6:g} "
                                   f"(--max-pixels)", height, width)
    return None if stored["reason"] == "too large" else stored


def precheck(data: bytes) -> dict | None:
    """The verdict on bytes that need no decoding: empty, or not a format tlapp reads
    (another image format, or not an image); None for the others."""
    if not data:
        return record("empty", "the file has 0 bytes")
    return _identify(data) if sniff_format(data) is None else None


@functools.cache
def compiled_check(kind: str, max_pixels: int):
    """`check_image` on bytes `precheck` passed whose `file_kind` is `kind`, as a
    tf.function for tf.data, traced once per process: (height, width, decoded pixel count).
    Fails where check_image finds a problem (too large included); check_image then says
    which. The decode op of `decode_image` alone, one straight graph per kind: what follows
    the decode there cannot fail, and the full decoder's switch over formats costs tf.data
    several times more per file."""
    def check(data):
        shape, pixels = raw_pixels(data, kind, VALIDATION_SIZE, max_pixels)
        return shape[0], shape[1], tf.size(pixels, out_type=tf.int64)
    return tf.function(check, input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
