"""The one decoder (`tlapp.data.decoding.decode_image`) against Pillow's reading of the same files."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from tlapp.data import decoding

SIZE = 32


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def smooth(height: int = SIZE, width: int = SIZE) -> np.ndarray:
    """Gradients plus an off-centre red block: smooth (small JPEG error) and asymmetric (every
    orientation looks different)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + 2 * y) * 80 // width + 40], -1)
    pixels[: height // 4, : width // 2] = [230, 20, 20]
    return pixels.clip(0, 255).astype(np.uint8)


def decoded(data: bytes, size: int = SIZE, **options) -> np.ndarray:
    return decoding.decode_image(data, size, **options).numpy()


def pillow_rgb(data: bytes) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"),
                      dtype=np.float32)


def on_white(rgba: np.ndarray) -> np.ndarray:
    image = Image.fromarray(rgba, "RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, image).convert("RGB"), dtype=np.float32)


@pytest.mark.parametrize("mode, fmt, options", [
    ("RGB", "PNG", {}), ("RGB", "BMP", {}), ("RGB", "GIF", {}), ("RGB", "WEBP", {"lossless": True}),
    ("RGB", "JPEG", {"quality": 90}), ("L", "PNG", {}), ("L", "JPEG", {}), ("P", "PNG", {}),
    ("L", "BMP", {}), ("RGBA", "BMP", {}),
])
def test_formats_decode_to_the_rgb_pillow_sees(mode, fmt, options):
    data = encode(Image.fromarray(smooth()).convert(mode), fmt, **options)
    image = decoded(data)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.float32
    # Same size in and out: the resize is the identity; JPEG uses the accurate integer IDCT
    # that Pillow's libjpeg uses, so even JPEG matches exactly.
    np.testing.assert_allclose(image, pillow_rgb(data), atol=1e-3)
    assert decoding.sniff_format(data) == fmt.lower()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_alpha_is_composited_on_white(fmt):
    rgba = np.dstack([smooth(), np.tile(np.linspace(0, 255, SIZE), (SIZE, 1)).astype(np.uint8)])
    rgba[rgba[..., 3] < 40, :3] = [0, 255, 0]  # garish colour under the transparent pixels
    data = encode(Image.fromarray(rgba, "RGBA"), fmt, **({"lossless": True} if fmt == "WEBP"
                                                         else {}))
    image = decoded(data)
    np.testing.assert_allclose(image, on_white(rgba), atol=0.51)  # Pillow rounds to uint8
    assert image[:, 0].min() > 254  # fully transparent column: white, not green


def test_transparent_gray_and_palette_pngs_are_composited_on_white():
    gray_alpha = Image.fromarray(smooth()).convert("LA")
    gray_alpha.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, SIZE), (SIZE, 1))
                                        .astype(np.uint8)))
    palette = Image.fromarray(smooth()).convert("P")
    transparent_index = palette.getpixel((0, 0))
    for image, options in ((gray_alpha, {}), (palette, {"transparency": transparent_index})):
        data = encode(image, "PNG", **options)
        expected = on_white(np.asarray(Image.open(io.BytesIO(data)).convert("RGBA")))
        np.testing.assert_allclose(decoded(data), expected, atol=0.51)
    assert decoded(encode(palette, "PNG", transparency=transparent_index))[0, 0].min() > 254


def test_sixteen_bit_png_scales_to_the_same_pixels_as_eight_bit():
    pixels = smooth()
    for channels in (3, 1):
        sixteen = tf.io.encode_png(pixels[..., :channels].astype(np.uint16) * 257).numpy()
        assert sixteen[24] == 16  # the PNG header's bit depth
        eight = encode(Image.fromarray(pixels[..., :channels].squeeze()), "PNG")
        np.testing.assert_allclose(decoded(sixteen), decoded(eight), atol=1e-3)


def test_cmyk_jpeg_equals_its_rgb_twin_within_tolerance():
    rgb = smooth()
    data = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = decoded(data)
    difference = np.abs(image - rgb)
    assert difference.mean() < 2 and difference.max() < 24
    assert np.abs(image - pillow_rgb(data)).mean() < 2


def exif_segment(orientation: int, big_endian: bool, tiff: bytes | None = None) -> bytes:
    order = "big" if big_endian else "little"
    if tiff is None:
        tiff = (b"MM\0*" if big_endian else b"II*\0") + (8).to_bytes(4, order) \
            + (1).to_bytes(2, order) + (0x0112).to_bytes(2, order) + (3).to_bytes(2, order) \
            + (1).to_bytes(4, order) + orientation.to_bytes(2, order) + b"\0\0" \
            + (0).to_bytes(4, order)
    payload = b"Exif\0\0" + tiff
    return b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload


def with_segment(jpeg: bytes, segment: bytes) -> bytes:
    """Inserts a segment after SOI and the JFIF APP0 segment Pillow writes."""
    assert jpeg[2:4] == b"\xff\xe0"
    end = 4 + int.from_bytes(jpeg[4:6], "big")
    return jpeg[:end] + segment + jpeg[end:]


@pytest.mark.parametrize("big_endian", [False, True])
def test_every_exif_orientation_is_turned_upright_like_pillow(big_endian):
    plain = encode(Image.fromarray(smooth()), "JPEG", quality=95)
    results = []
    for orientation in range(1, 9):
        data = with_segment(plain, exif_segment(orientation, big_endian))
        assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))) is not None
        image = decoded(data)
        np.testing.assert_allclose(image, pillow_rgb(data), atol=1e-3, err_msg=str(orientation))
        results.append(image)
    for i in range(8):  # the test image tells all eight apart
        for j in range(i):
            assert np.abs(results[i] - results[j]).max() > 50


def test_rotated_photo_equals_its_upright_twin_at_any_aspect_ratio():
    upright = smooth(36, 48)
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # a camera held upright, sensor turned
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    twin = encode(Image.fromarray(pillow_rgb(data).astype(np.uint8)), "PNG")
    assert Image.open(io.BytesIO(twin)).size == (48, 36)
    np.testing.assert_allclose(decoded(data), decoded(twin), atol=1e-3)
    as_stored = encode(Image.fromarray(stored), "PNG")
    assert np.abs(decoded(data) - decoded(as_stored)).mean() > 20


@pytest.mark.parametrize("segment", [
    exif_segment(1, False, tiff=b"XX" + bytes(30)),  # not a TIFF header
    exif_segment(1, False, tiff=b"II*\0" + b"\xff\xff\xff\xff" + bytes(8)),  # offset past end
    exif_segment(1, True, tiff=b"MM\0*" + (8).to_bytes(4, "big") + b"\xff\xff" + bytes(40)),
    exif_segment(9, False),  # not a valid orientation
    exif_segment(6, False, tiff=b"II*\0\x08\0"),  # cut short
    b"\xff\xfe\x00\x0eExif\0\0II*\0\x08\0",  # a comment that mentions Exif
])
def test_malformed_exif_is_ignored_not_fatal(segment):
    plain = encode(Image.fromarray(smooth()), "JPEG", quality=95)
    np.testing.assert_allclose(decoded(with_segment(plain, segment)), decoded(plain), atol=1e-3)


def test_gif_first_frame_is_used():
    first, second = smooth(), 255 - smooth()
    frames = [Image.fromarray(first), Image.fromarray(second)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    np.testing.assert_allclose(decoded(data), pillow_rgb(data), atol=1e-3)
    assert np.abs(decoded(data) - first).mean() < 5


def test_header_shape_of_every_format_without_decoding():
    image = Image.fromarray(smooth(20, 30))
    rgba = Image.fromarray(np.dstack([smooth(20, 30), np.full((20, 30), 100, np.uint8)]), "RGBA")
    for data in (encode(image, "JPEG"), encode(image, "PNG"), encode(image, "GIF"),
                 encode(image, "BMP"), encode(image, "WEBP"), encode(image, "WEBP", lossless=True),
                 encode(rgba, "WEBP"), encode(rgba, "WEBP", lossless=True)):
        assert decoding.image_shape(data) == (20, 30), data[:16]


def test_pixel_limit_refuses_before_decoding():
    data = encode(Image.fromarray(smooth()), "PNG")
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        decoded(data, max_pixels=SIZE * SIZE - 1)
    assert decoding.describe_error(error.value).startswith("image too large")
    assert decoded(data, max_pixels=SIZE * SIZE).shape == (SIZE, SIZE, 3)
    assert decoded(data, max_pixels=None).shape == (SIZE, SIZE, 3)


def test_huge_jpeg_is_decoded_at_reduced_scale(huge_jpeg):
    assert decoding.image_shape(huge_jpeg) == (13000, 14000)
    image = decoded(huge_jpeg)
    np.testing.assert_allclose(image, 128, atol=2)

    def scale(height, width, size):
        return int(decoding.jpeg_scale_index(tf.constant(height, tf.int64),
                                             tf.constant(width, tf.int64), size))

    assert scale(13000, 14000, SIZE) == 3  # 1/8: 1625x1750 pixels
    assert scale(13000, 14000, 4000) == 1  # never more than 64 megapixels decoded at once
    assert scale(300, 400, 224) == 0 and scale(3000, 4000, 224) == 2


def test_unsupported_and_damaged_bytes_raise_a_readable_error():
    cases = {b"": "not a JPEG", b"plain text": "not a JPEG",
             encode(Image.fromarray(smooth()), "TIFF"): "not a JPEG",
             encode(Image.fromarray(smooth()), "PNG")[:60]: "PNG"}
    for data, message in cases.items():
        with pytest.raises(tf.errors.InvalidArgumentError) as error:
            decoded(data)
        assert message in decoding.describe_error(error.value)


def test_graph_and_eager_decoding_agree():
    exif = Image.Exif()
    exif[0x0112] = 8
    rgba = np.dstack([smooth(), np.full((SIZE, SIZE), 90, np.uint8)])
    files = [encode(Image.fromarray(smooth(40, 24)), "JPEG", exif=exif.tobytes()),
             encode(Image.fromarray(rgba, "RGBA"), "PNG")]
    dataset = tf.data.Dataset.from_tensor_slices(files).map(
        lambda data: decoding.decode_image(data, SIZE))
    for data, from_dataset in zip(files, dataset):
        np.testing.assert_allclose(from_dataset.numpy(), decoded(data), atol=1e-4)
        np.testing.assert_allclose(decoding.decode_file_bytes(data, SIZE), decoded(data),
                                   atol=1e-4)
