"""The one image decoder, written in TensorFlow ops only.

Hand-written rather than `tf.io.decode_image` plus Python: the exported SavedModel must
decode files inside its graph exactly as training did.

Training (tf.data), feature extraction, the scan's validation, `tlapp predict` and the
exported SavedModel all call `decode_image`, so they see identical pixels. It:

- picks the decoder by content, not by file name (a PNG named .jpg is a PNG);
- turns grayscale, palette, 16-bit, CMYK and alpha images into RGB in [0, 255], with
  transparent pixels composited on white;
- decodes a huge JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when that still
  leaves at least twice the target resolution, so a 14000x13000 photo costs ~3 megapixels;
- applies the EXIF orientation of JPEG files (read from the APP1 segment with tensor ops);
- refuses, before decoding, an image whose header declares more than `max_pixels`.
"""
from __future__ import annotations

import functools
import re

import numpy as np
import tensorflow as tf

from tlapp.constants import DEFAULT_MAX_PIXELS

DECODER_VERSION = "tlapp-decode-2"  # part of the feature cache key: bump when pixels change
FORMATS = ("jpeg", "png", "gif", "bmp", "webp")
EXIF_SEARCH_BYTES = 1 << 16  # the EXIF segment must start in a JPEG's first 64 KiB
MAX_IFD_ENTRIES = 64
# format -> alternatives, each a list of (offset, bytes) that must all match
_SIGNATURES = {"jpeg": [[(0, b"\xff\xd8\xff")]], "png": [[(0, b"\x89PNG\r\n\x1a\n")]],
               "gif": [[(0, b"GIF87a")], [(0, b"GIF89a")]], "bmp": [[(0, b"BM")]],
               "webp": [[(0, b"RIFF"), (8, b"WEBP")]]}


def sniff_format(data: bytes) -> str | None:
    """The format `decode_image` will decode these bytes as, or None (not one it reads)."""
    for name in FORMATS:
        if any(all(data[at:at + len(magic)] == magic for at, magic in option)
               for option in _SIGNATURES[name]):
            return name
    return None


class _Bytes:
    """The first `length` bytes of a file as integers; reads past the end give 0, so
    parsing a damaged or hostile header never raises."""

    def __init__(self, data: tf.Tensor, length: int):
        raw = tf.io.decode_raw(tf.strings.substr(data, 0, length), tf.uint8)
        self.values = tf.concat([raw, tf.zeros([16], tf.uint8)], 0)
        self.size = tf.size(self.values, out_type=tf.int64)

    def read(self, offsets, width: int = 1, little=True) -> tf.Tensor:
        """Unsigned `width`-byte integers at `offsets` (a scalar or a vector), little- or
        big-endian (`little` may be a tensor); one gather however many are read."""
        positions = tf.expand_dims(tf.cast(offsets, tf.int64), -1) + tf.range(width, dtype=tf.int64)
        values = tf.cast(tf.gather(self.values, tf.clip_by_value(
            positions, tf.constant(0, tf.int64), self.size - 1)), tf.int64)
        powers = 256 ** tf.range(width, dtype=tf.int64)
        return tf.reduce_sum(values * tf.where(little, powers, tf.reverse(powers, [0])), -1)


def _format_index(data: tf.Tensor) -> tf.Tensor:
    """Index into FORMATS, or len(FORMATS) for anything else (as `sniff_format`)."""
    start = tf.strings.join([tf.strings.substr(data, 0, 12), b"\0" * 12])  # >= 12 bytes
    index = tf.constant(len(FORMATS), tf.int32)
    for i, name in reversed(list(enumerate(FORMATS))):
        hit = tf.reduce_any([tf.reduce_all([tf.equal(tf.strings.substr(start, at, len(magic)),
                                                     magic) for at, magic in option])
                             for option in _SIGNATURES[name]])
        index = tf.where(hit, tf.constant(i, tf.int32), index)
    return index


def _declared_shape(data: tf.Tensor, kind: str) -> tf.Tensor:
    """[height, width] (int64) as the header of a `kind` file (one of FORMATS) declares them."""
    if kind == "jpeg":
        return tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64)
    head = _Bytes(data, 32)
    if kind == "png":
        return tf.stack([head.read(20, 4, False), head.read(16, 4, False)])
    if kind == "gif":
        return tf.stack([head.read(8, 2), head.read(6, 2)])
    if kind == "bmp":
        core = tf.equal(head.read(14, 4), 12)  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        height = tf.where(core, head.read(20, 2), head.read(22, 4))
        return tf.stack([tf.where(height >= 2**31, 2**32 - height, height),  # < 0: top-down
                         tf.where(core, head.read(18, 2), head.read(18, 4))])
    b1, b2, b3, b4 = (head.read(21 + i) for i in range(4))
    chunk = head.read(12, 4, False)
    return tf.where(
        tf.equal(chunk, int.from_bytes(b"VP8L", "big")),
        tf.stack([1 + (b4 % 16) * 1024 + b3 * 4 + b2 // 64, 1 + (b2 % 64) * 256 + b1]),
        tf.where(tf.equal(chunk, int.from_bytes(b"VP8X", "big")),
                 tf.stack([1 + head.read(27, 3), 1 + head.read(24, 3)]),
                 tf.stack([head.read(28, 2) % 16384, head.read(26, 2) % 16384])))


def header_shape(data: tf.Tensor) -> tf.Tensor:
    """[height, width] (int64) an encoded image's header declares ([0, 0] for a format
    `decode_image` does not read), in TensorFlow ops (for tf.data and graphs)."""
    return tf.switch_case(_format_index(data), [
        lambda kind=kind: _declared_shape(data, kind) for kind in FORMATS
    ] + [lambda: tf.zeros([2], tf.int64)])


@functools.cache
def _compiled_shape():
    return tf.function(header_shape)


def image_shape(data: tf.Tensor | bytes) -> tuple[int, int]:
    """(height, width) declared by an encoded image's header, without decoding it.

    Raises:
        tf.errors.InvalidArgumentError: a JPEG whose header cannot be parsed.
    """
    height, width = _compiled_shape()(tf.convert_to_tensor(data, tf.string)).numpy()
    return int(height), int(width)


def jpeg_orientation(data: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (1-8) of a JPEG, read from the first "Exif" APP1 segment in its
    first 64 KiB; 1 when absent or unreadable."""
    window = tf.strings.substr(data, 0, EXIF_SEARCH_BYTES)
    before = tf.strings.split(window, sep=b"Exif\0\0", maxsplit=1)
    segment = tf.cast(tf.strings.length(before[0]), tf.int64) - 4  # the APP1 marker
    header = _Bytes(window, EXIF_SEARCH_BYTES)
    tiff = segment + 10
    start = header.read(segment, 2, False)  # 0xFFE1
    byte_order = header.read(tiff, 4, False)  # "II*\0" or "MM\0*"
    little = tf.equal(byte_order, 0x49492A00)
    valid = (tf.size(before) > 1) & tf.equal(start, 0xFFE1) & (
        little | tf.equal(byte_order, 0x4D4D002A))
    directory = tiff + header.read(tiff + 4, 4, little)
    count = header.read(directory, 2, little)
    entries = tf.range(MAX_IFD_ENTRIES, dtype=tf.int64)
    fields = tf.reshape(header.read(directory + 2 + 12 * entries[:, None] +
                                    tf.constant([0, 8], tf.int64), 2, little), [-1, 2])
    is_orientation = (entries < count) & tf.equal(fields[:, 0], 0x0112)
    value = tf.gather(fields[:, 1], tf.argmax(tf.cast(is_orientation, tf.int32)))
    valid &= tf.reduce_any(is_orientation) & (value >= 1) & (value <= 8)
    return tf.cast(tf.where(valid, value, 1), tf.int32)


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Turns square pixels stored with EXIF `orientation` (1-8) upright, as Pillow's
    `ImageOps.exif_transpose` does."""
    transpose = functools.partial(tf.transpose, perm=[1, 0, 2])
    turns = [
        lambda: tf.reverse(image, [1]),  # 2: mirrored left-right
        lambda: tf.reverse(image, [0, 1]),  # 3: upside down
        lambda: tf.reverse(image, [0]),  # 4: mirrored top-bottom
        lambda: transpose(image),  # 5: mirrored along the main diagonal
        lambda: tf.reverse(transpose(image), [1]),  # 6: stored turned 90° counter-clockwise
        lambda: tf.reverse(transpose(image), [0, 1]),  # 7: mirrored along the other diagonal
        lambda: tf.reverse(transpose(image), [0]),  # 8: stored turned 90° clockwise
    ]
    # Most photos are upright: one cheap test, and the switch only when needed.
    return tf.cond(tf.equal(orientation, 1), lambda: image,
                   lambda: tf.switch_case(orientation - 2, turns))


def jpeg_scale_index(height: tf.Tensor, width: tf.Tensor, image_size: int) -> tf.Tensor:
    """Index into ratios (1, 2, 4, 8): the largest that leaves the short side at least twice
    `image_size`, and at least the one that keeps the decoded image under 64 megapixels."""
    short = tf.minimum(height, width)
    quality = tf.reduce_sum(tf.cast(short // tf.constant([2, 4, 8], tf.int64) >= 2 * image_size,
                                    tf.int32))
    memory = tf.reduce_sum(tf.cast(height * width // tf.constant([1, 4, 16], tf.int64)
                                   > 64_000_000, tf.int32))
    return tf.maximum(quality, memory)


def _resized_rgb(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """[h, w, 1-4] decoded pixels (gray, gray + alpha, RGB, RGBA; uint8 or uint16) ->
    [size, size, 3] float RGB in [0, 255], transparent pixels composited on white.

    Resizing is linear, so compositing the premultiplied colour after resizing equals
    compositing before, and only the resize itself needs a full-size float copy.
    """
    scale = 255.0 / image.dtype.max

    def resize(pixels):
        return tf.image.resize(pixels, [image_size, image_size], method="bilinear",
                               antialias=True)

    def rgb(color):  # [size, size, 1 or 3]
        return tf.tile(color, [1, 1, 3]) if color.shape[-1] == 1 else color

    def composite(color_channels):
        color, alpha = image[..., :color_channels], image[..., color_channels:color_channels + 1]

        def transparent():
            opacity = tf.cast(alpha, tf.float32) / image.dtype.max
            premultiplied = resize(tf.cast(color, tf.float32) * opacity) * scale
            return rgb(premultiplied + 255.0 * (1.0 - resize(opacity)))

        return tf.cond(tf.reduce_all(alpha == image.dtype.max),
                       lambda: rgb(resize(color) * scale), transparent)

    branches = [lambda: rgb(resize(image[..., :1]) * scale), lambda: composite(1),
                lambda: resize(image[..., :3]) * scale, lambda: composite(3)]
    if image.shape[-1] is not None:  # known when tracing: the other branches cannot build
        return branches[image.shape[-1] - 1]()
    return tf.switch_case(tf.shape(image)[-1] - 1, branches)


def file_kind(data: bytes) -> str | None:
    """The decoder `decode_image` uses for these bytes: one of KINDS (a 16-bit PNG is
    "png16"), or None for a format it does not read."""
    kind = sniff_format(data)
    return "png16" if kind == "png" and data[24:25] == b"\x10" else kind


KINDS = FORMATS + ("png16",)


def raw_pixels(data: tf.Tensor, kind: str, image_size: int, max_pixels: int | None
               ) -> tuple[tf.Tensor, tf.Tensor]:
    """(declared [height, width], decoded pixels before resizing) of a file `file_kind`
    calls `kind`: the decode op of `decode_image` with its arguments, behind its pixel limit.
    Fails where `decode_image` fails (what follows the decode cannot fail)."""
    shape = _declared_shape(data, "png" if kind == "png16" else kind)
    if kind == "jpeg":  # libjpeg's DCT scaling for huge photos (see jpeg_scale_index)
        def decode():
            return tf.switch_case(
                jpeg_scale_index(shape[0], shape[1], image_size),
                [lambda ratio=ratio: tf.io.decode_jpeg(data, channels=3, ratio=ratio,
                                                       dct_method="INTEGER_ACCURATE")
                 for ratio in (1, 2, 4, 8)])
    elif kind in ("png", "png16"):  # channels=4: libpng expands gray, palette and tRNS
        def decode():
            return tf.io.decode_png(data, 4, tf.uint16 if kind == "png16" else tf.uint8)
    else:  # GIF, BMP, WebP in their own channels; animations: the first frame
        def decode():
            return tf.io.decode_image(data, expand_animations=False)
    if max_pixels is None:
        return shape, decode()
    check = tf.debugging.Assert(shape[0] * shape[1] <= max_pixels, [
        f"image too large: more than {max_pixels} pixels (height, width)", shape])
    with tf.control_dependencies([check]):
        return shape, decode()


def decode_image(data: tf.Tensor | bytes, image_size: int,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tf.Tensor:
    """Encoded file bytes -> float32 upright RGB pixels in [0, 255], resized to a square.

    Args:
        data: a scalar string tensor (or bytes): a JPEG, PNG, GIF (first frame), BMP or WebP.
        image_size: side of the square output.
        max_pixels: refuse images whose header declares more pixels (None: no limit).

    Raises:
        tf.errors.InvalidArgumentError: not a supported image, damaged, or too large.
    """
    data = tf.convert_to_tensor(data, tf.string)
    index = _format_index(data)

    def jpeg():  # libjpeg turns gray and CMYK into RGB
        _, pixels = raw_pixels(data, "jpeg", image_size, max_pixels)
        # Turning a square commutes with resizing it, and is cheaper after.
        return apply_orientation(_resized_rgb(pixels, image_size), jpeg_orientation(data))

    def other(kind):
        return _resized_rgb(raw_pixels(data, kind, image_size, max_pixels)[1], image_size)

    def unknown():
        check = tf.debugging.Assert(index < len(FORMATS),
                                    ["not a JPEG, PNG, GIF, BMP or WebP file"])
        with tf.control_dependencies([check]):
            return tf.zeros([image_size, image_size, 3])

    # One flat switch (nested control flow is slow in tf.data); 16-bit PNGs get their own.
    bit_depth = tf.strings.substr(tf.strings.join([tf.strings.substr(data, 0, 25), b"\0" * 25]),
                                  24, 1)
    branch = tf.where((index == 1) & tf.equal(bit_depth, b"\x10"), len(FORMATS) + 1, index)
    image = tf.switch_case(branch, [jpeg, lambda: other("png"), lambda: other("gif"),
                                    lambda: other("bmp"), lambda: other("webp"), unknown,
                                    lambda: other("png16")])
    return tf.ensure_shape(image, [image_size, image_size, 3])


@functools.cache
def compiled_decoder(image_size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """`decode_image` as a tf.function for one setting: many times faster than eager calls."""
    return tf.function(lambda data: decode_image(data, image_size, max_pixels))


def decode_file_bytes(data: bytes, image_size: int,
                      max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`decode_image` on one file's bytes, compiled; returns [size, size, 3] float32."""
    return compiled_decoder(image_size, max_pixels)(tf.constant(data)).numpy()


def describe_error(error: Exception) -> str:
    """A decode error's message without TensorFlow's op and graph decorations."""
    message = getattr(error, "message", str(error)).strip().splitlines()[0]
    message = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", message)
    message = re.sub(r"\s*\[(Op|\[).*$", "", message)
    summarized = re.findall(r"Summarized data: b'([^']*)'", message)
    if summarized:
        return summarized[0]
    asserted = re.search(r"assertion failed: \[(.*?)\]\s*(\[.*\])?", message)
    if asserted:
        return asserted.group(1) + (f" {asserted.group(2)}" if asserted.group(2) else "")
    return message.rstrip(". ") or type(error).__name__
