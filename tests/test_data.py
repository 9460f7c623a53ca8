import colorsys
import io
import json
import os
import random
import struct
import zlib
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from tests.conftest import CLASS_HUES, make_folder, write_image
from tlapp import cli
from tlapp.errors import UserInputError
from tlapp.training import checkpoint
from tlapp import constants
from tlapp.data import decoding
from tlapp.training import fit
from tlapp.data import scan


def splits_of(scanned):
    return {s.path: s.split for s in scanned.samples}


def test_scan_finds_classes_splits_and_skips(image_folder):
    (image_folder / "cat" / "broken.jpg").write_bytes(b"not an image at all")
    (image_folder / "dog" / "empty.png").write_bytes(b"")
    (image_folder / "dog" / ".DS_Store").write_bytes(b"\0\0")
    (image_folder / "fox" / "notes.txt").write_text("hello")
    (image_folder / "README.md").write_text("top-level file")
    write_image(image_folder / "fox" / "nested" / "deeper" / "Fox Ä.JPG", 0.6,
                np.random.default_rng(0))

    scanned = scan.scan_folder(image_folder)

    assert scanned.classes == ["cat", "dog", "fox"]
    assert len(scanned.samples) == 25
    assert {s["path"]: s["reason"] for s in scanned.skipped} == {
        "cat/broken.jpg": "not an image", "dog/empty.png": "empty"}
    assert sorted(scanned.ignored) == ["README.md", "dog/.DS_Store", "fox/notes.txt"]
    nested = next(s for s in scanned.samples if s.path.endswith("Fox Ä.JPG"))
    assert nested.label == 2
    counts = scanned.counts()
    assert counts["found"] == 30 and counts["used"] == 25 and counts["skipped"] == 2
    assert counts["ignored"] == 3
    for label in range(3):
        assert {s.split for s in scanned.samples if s.label == label} == {"train", "val", "test"}
    split = scanned.split_json()
    assert set(split) == {"train", "val", "test", "skipped", "ignored"}
    assert sum(len(split[k]) for k in ("train", "val", "test")) == 25


def test_adding_files_keeps_every_existing_file_in_its_split(tmp_path):
    root = make_folder(tmp_path / "data", per_class=30)
    before = splits_of(scan.scan_folder(root))
    rng = np.random.default_rng(5)
    for i in range(10):
        write_image(root / "dog" / f"new_{i}.png", 0.33, rng)
    after = splits_of(scan.scan_folder(root))
    assert len(after) == len(before) + 10
    assert {p: after[p] for p in before} == before


def test_assign_splits_is_stable_and_fills_val_and_test():
    rng = random.Random(0)
    for trial in range(200):
        paths = [f"c/{rng.random():.12f}.jpg" for _ in range(rng.randint(3, 12))]
        split = scan.assign_splits(paths, 0.1, 0.1)
        assert set(split.values()) == {"train", "val", "test"}, paths
        # a file's split depends on its own path except where a class needed filling
        natural = {p: scan.assign_splits([p] * 1, 0.1, 0.1)[p] for p in paths}
        moved = [p for p in paths if split[p] != natural[p]]
        assert len(moved) <= 2
    big = [f"c/{i}.jpg" for i in range(2000)]
    split = scan.assign_splits(big, 0.1, 0.2)
    fractions = {k: list(split.values()).count(k) / len(big) for k in ("val", "test")}
    assert abs(fractions["val"] - 0.1) < 0.03 and abs(fractions["test"] - 0.2) < 0.03


def test_presplit_layout_is_used_as_given(tmp_path):
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        make_folder(tmp_path / "data" / split, per_class=n, seed=n)
    scanned = scan.scan_folder(tmp_path / "data")
    assert scanned.classes == ["cat", "dog", "fox"]
    assert scanned.counts()["train"] == 18
    assert scanned.counts()["val"] == 6
    assert scanned.counts()["test"] == 9
    assert all(s.path.startswith(s.split + "/") for s in scanned.samples)


def test_presplit_without_val_carves_it_from_train(tmp_path):
    make_folder(tmp_path / "data" / "train", per_class=10)
    make_folder(tmp_path / "data" / "test", per_class=2, seed=3)
    scanned = scan.scan_folder(tmp_path / "data")
    assert all(s.path.startswith("train/") for s in scanned.split("val"))
    assert all(s.path.startswith("test/") for s in scanned.split("test"))
    assert len(scanned.split("val")) >= 3


@pytest.mark.parametrize("layout, message", [
    ("missing", "Data folder not found"),
    ("one_class", "1 class folder"),
    ("empty_class", "holds no images"),
    ("undecodable_class", "no image that decodes"),
])
def test_bad_folders_are_user_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        make_folder(root, per_class=3, classes={"cat": 0} if layout == "one_class" else
                    {"cat": 0, "dog": 0.3})
    if layout == "empty_class":
        (root / "emu").mkdir()
    if layout == "undecodable_class":
        (root / "emu").mkdir()
        (root / "emu" / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(UserInputError, match=message):
        scan.scan_folder(root)


def test_decode_image_formats_and_size(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    for ext in ("png", "jpg", "bmp", "gif", "webp"):
        path = tmp_path / f"x.{ext}"
        Image.fromarray(pixels).save(path)
        image = decoding.decode_image(path.read_bytes(), 16)
        assert image.shape == (16, 16, 3) and image.dtype.name == "float32", ext
        assert 0 <= float(np.min(image)) and float(np.max(image)) <= 255


def test_expand_inputs(tmp_path, image_folder):
    files = scan.expand_inputs([str(image_folder / "cat"), str(image_folder / "dog/*.png"),
                                    str(tmp_path / "nope.jpg")])
    assert len(files) == 8 + 4 + 1 and files[-1].endswith("nope.jpg")


def test_split_json_round_trips(image_folder):
    scanned = scan.scan_folder(image_folder)
    assert json.loads(json.dumps(scanned.split_json()))["skipped"] == []


# --- A folder with every messy case --------------------------------------------------------

def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def smooth(height: int, width: int, hue: float) -> np.ndarray:
    """A smooth picture in one hue (small JPEG error) with an asymmetric bright block."""
    rgb = np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.8)) * 255
    y, x = np.mgrid[0:height, 0:width]
    pixels = rgb * (0.6 + 0.4 * x[..., None] / width) * (0.7 + 0.3 * y[..., None] / height)
    pixels[: height // 4, : width // 2] = 250
    return pixels.clip(0, 255).astype(np.uint8)


def bomb_png(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side x side pixels in ~60 KB: a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    compressor, row = zlib.compressobj(1), bytes(1 + side // 8)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
            + chunk(b"IEND", b""))


def make_messy_folder(root: Path, huge_jpeg: bytes) -> dict[str, str]:
    """Writes cat/, dog/, fox/ with every case of issue 3, and returns each file's expected
    fate: "used", the skip reason, or "ignored"."""
    rng = np.random.default_rng(0)
    expected = {}

    def put(relative: str, data: bytes | Image.Image, fate: str = "used", **options):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Image.Image):
            data.save(path, **options)
        else:
            path.write_bytes(data)
        expected[relative] = fate

    def link(relative: str, target: str, fate: str):
        (root / relative).symlink_to(target)
        expected[relative] = fate

    for name, count in (("cat", 6), ("dog", 6), ("fox", 2)):  # plain images
        for i in range(count):
            write_image(root / name / f"{name}_{i:02d}{'.jpg' if i % 2 == 0 else '.png'}",
                        CLASS_HUES[name] + rng.uniform(-0.04, 0.04), rng)
            expected[f"{name}/{name}_{i:02d}{'.jpg' if i % 2 == 0 else '.png'}"] = "used"
    cat = smooth(36, 48, 0.0)
    image = Image.fromarray(cat)
    # Formats, extensions in any case, a PNG named .jpg, nested folders, odd names.
    put("cat/UPPER.JPG", image, format="JPEG")
    put("cat/Mixed.Jpeg", image.rotate(10), format="JPEG")
    put("cat/lies.jpg", encode(image.rotate(20), "PNG"))
    put("cat/anim.gif", encode(image, "GIF", save_all=True, duration=50,
                               append_images=[Image.fromarray(255 - cat)]))
    put("cat/pic.bmp", image.rotate(30))
    put("cat/photo.webp", image.rotate(40), quality=80)
    put("cat/nested/deeper/Ünïcødé name 猫.jpg", image.rotate(50))
    put("cat/huge.jpg", huge_jpeg)
    # Colour: gray, palette, 16-bit, CMYK (with its RGB twin), alpha (with white twins).
    put("cat/gray.png", image.convert("L"))
    put("cat/gray.jpg", image.rotate(60).convert("L"))
    put("cat/palette.png", image.rotate(70).convert("P"))
    put("cat/sixteen.png", tf.io.encode_png(np.rot90(cat).astype(np.uint16) * 257).numpy())
    put("cat/cmyk.jpg", image.convert("CMYK"), quality=95)
    put("cat/cmyk_source.png", image)
    alpha = np.dstack([cat, np.tile(np.linspace(0, 255, 48), (36, 1)).astype(np.uint8)])
    alpha[alpha[..., 3] < 60, :3] = [0, 255, 0]  # garish colour under transparent pixels
    white = Image.new("RGBA", (48, 36), (255, 255, 255, 255))
    put("cat/alpha.png", Image.fromarray(alpha, "RGBA"))
    put("cat/alpha.webp", Image.fromarray(alpha, "RGBA"), lossless=True)
    put("cat/alpha_on_white.png",
        Image.alpha_composite(white, Image.fromarray(alpha, "RGBA")).convert("RGB"))
    # EXIF orientation 6: stored turned 90° counter-clockwise; its upright twin as Pillow sees it.
    exif = Image.Exif()
    exif[0x0112] = 6
    put("cat/rotated_6.jpg", Image.fromarray(np.ascontiguousarray(np.rot90(cat))), quality=95,
        exif=exif.tobytes())
    put("cat/upright.png", ImageOps.exif_transpose(Image.open(root / "cat/rotated_6.jpg")))
    # Duplicates: a copy in a subfolder and a symlink; a symlink loop back to the root.
    put("cat/copies/cat_00 copy.jpg", (root / "cat/cat_00.jpg").read_bytes())
    link("cat/link.jpg", "cat_00.jpg", "used")
    (root / "cat" / "loop").symlink_to("..", target_is_directory=True)
    # Damaged and unsupported files: skipped with a reason.
    jpeg = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    png = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)), "PNG")
    corrupt = bytearray(png)
    corrupt[len(png) // 2:len(png) // 2 + 64] = bytes(64)
    put("dog/empty.jpg", b"", "empty")
    put("dog/truncated.jpg", jpeg[: len(jpeg) // 2], "truncated")
    put("dog/truncated.png", png[: len(png) * 2 // 3], "truncated")
    put("dog/corrupt.png", bytes(corrupt), "corrupt")
    put("dog/text.jpg", b"this is not an image\n" * 20, "not an image")
    put("dog/random.png", rng.integers(0, 255, 500, np.uint8).tobytes(), "not an image")
    put("dog/scan.tiff", image, "unsupported format")
    put("dog/onebit.bmp", image.convert("1"), "unsupported format")
    put("dog/bomb.png", bomb_png(), "too large")
    link("dog/broken_link.jpg", "missing.jpg", "unreadable")
    # Hidden, system and non-image files: ignored and counted.
    for relative in (".DS_Store", "README.md", "cat/.DS_Store", "cat/._cat_00.jpg",
                     "cat/notes.txt", "cat/.thumbnails/t.jpg", "dog/Thumbs.db",
                     "dog/desktop.ini", "dog/labels.json", "__MACOSX/cat/._x.jpg",
                     ".hidden/x.jpg"):
        put(relative, jpeg if relative.endswith(".jpg") else b"\0\1junk", "ignored")
    return expected


def files_on_disk(root: Path) -> int:
    """Files (and file symlinks, even broken ones) without following directory links."""
    return sum(len(files) for _, _, files in os.walk(root))


@pytest.fixture
def messy(tmp_path, huge_jpeg):
    root = tmp_path / "messy"
    return root, make_messy_folder(root, huge_jpeg)


def test_messy_folder_every_file_used_or_listed(messy, tmp_path, caplog):
    root, expected = messy
    caplog.set_level("INFO", "tlapp")
    scanned = scan.scan_folder(root, cache_dir=tmp_path / "cache")
    out = "\n".join(caplog.messages)

    fates = {s.path: "used" for s in scanned.samples}
    fates |= {item["path"]: item["reason"] for item in scanned.skipped}
    fates |= {path: "ignored" for path in scanned.ignored}
    assert fates == expected
    counts = scanned.counts()
    assert counts["found"] == len(expected) == files_on_disk(root)
    assert counts["found"] == counts["used"] + counts["skipped"] + counts["ignored"]
    assert counts["skipped_by_reason"] == {"not an image": 2, "truncated": 2,
                                           "unsupported format": 2, "empty": 1, "corrupt": 1,
                                           "too large": 1, "unreadable": 1}
    assert all(item["detail"] for item in scanned.skipped)
    assert "20000x20000 is 400 megapixels" in next(
        item["detail"] for item in scanned.skipped if item["reason"] == "too large")
    # Nested images belong to their top-level class; duplicates share one split.
    nested = next(s for s in scanned.samples if "Ünïcødé" in s.path)
    assert scanned.classes[nested.label] == "cat"
    copies = [s for s in scanned.samples if s.sha256 == nested.sha256 or
              s.path in ("cat/cat_00.jpg", "cat/copies/cat_00 copy.jpg", "cat/link.jpg")]
    assert len({s.split for s in copies if s.path != nested.path}) == 1
    assert counts["duplicates"] == 2
    # One summary, class counts, warnings; not a line per file.
    summary = next(line for line in out.splitlines() if "skipped 10" in line)
    assert summary.startswith(f"scan: used {counts['used']} of {len(expected)} files; skipped "
                              f"10: 2 not an image, 2 truncated, 2 unsupported format")
    assert f"ignored {counts['ignored']}" in summary
    assert "scan: classes cat 27, dog 6, fox 2" in out and "--class-weight auto" in out
    assert "class 'fox' has only 2 usable image(s)" in out
    assert "duplicate files" in out
    assert "dog/truncated.jpg" not in out


def test_second_scan_of_an_unchanged_folder_decodes_nothing(messy, tmp_path):
    root, _ = messy
    for folder, _, names in os.walk(root):  # older than the tick a scan cannot trust
        for name in names:
            os.utime(os.path.join(folder, name), (1e9, 1e9), follow_symlinks=False)
    cache = tmp_path / "cache"
    first = scan.scan_folder(root, cache_dir=cache)
    # Every distinct content once (copies may both be checked when in flight together).
    distinct = len({s.sha256 for s in first.samples}) + len(first.skipped) - 1  # not the link
    assert distinct <= first.checked <= len(first.samples) + len(first.skipped) - 1
    assert (cache / "scan").is_dir()
    store = next((cache / "scan").glob("*/checks-*.sqlite"))
    written = store.stat().st_mtime_ns, store.stat().st_size

    second = scan.scan_folder(root, cache_dir=cache)
    assert second.checked == 0
    assert second.samples == first.samples and second.skipped == first.skipped
    assert (store.stat().st_mtime_ns, store.stat().st_size) == written  # nothing rewritten

    # An edited file is checked again; a lower pixel limit needs no decode.
    write_image(root / "dog" / "dog_00.jpg", 0.5, np.random.default_rng(7))
    third = scan.scan_folder(root, cache_dir=cache, max_pixels=100_000_000)
    assert third.checked == 1
    assert {item["path"]: item["reason"] for item in third.skipped}["cat/huge.jpg"] == "too large"


def test_duplicates_across_classes_share_a_split_and_are_reported(tmp_path):
    root = make_folder(tmp_path / "data", per_class=12, classes={"cat": 0, "dog": 0.33})
    for i in range(12):  # the same files filed under both classes
        (root / "dog" / f"from_cat_{i}.jpg").write_bytes(
            (root / "cat" / f"cat_{i:02d}{'.jpg' if i % 2 else '.png'}").read_bytes())
    scanned = scan.scan_folder(root)
    by_content = {}
    for sample in scanned.samples:
        by_content.setdefault(sample.sha256, set()).add(sample.split)
    assert all(len(splits) == 1 for splits in by_content.values())
    assert scanned.duplicates == 12
    assert any("more than one class folder" in w for w in scanned.warnings)


def test_a_file_renamed_keeps_its_split(tmp_path):
    root = make_folder(tmp_path / "data", per_class=20, classes={"cat": 0, "dog": 0.33})
    before = {s.sha256: s.split for s in scan.scan_folder(root).samples}
    for path in list((root / "cat").iterdir()):
        path.rename(path.with_name("renamed " + path.name))
    after = {s.sha256: s.split for s in scan.scan_folder(root).samples}
    assert after == before


def test_class_with_only_hidden_files_is_an_empty_class(tmp_path, capsys):
    root = make_folder(tmp_path / "data", per_class=3, classes={"cat": 0, "dog": 0.3})
    (root / "emu").mkdir()
    (root / "emu" / ".DS_Store").write_bytes(b"\0")
    (root / "emu" / "._a.jpg").write_bytes(b"\0")
    code = cli.main(["train", str(root), "--weights", "none", "--cache-dir",
                     str(tmp_path / "cache"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and f"Class folder {root / 'emu'} holds no images" in err


# --- Acceptance: train on the messy folder, predict the twins ------------------------------

@pytest.mark.slow
def test_train_on_the_messy_folder_and_predict_the_twins(messy, tmp_path, capsys):
    import tensorflow as tf

    root, expected = messy
    run = tmp_path / "run"
    code = cli.main(["train", str(root), "--backbone", "resnet50", "--weights", "none",
                     "--image-size", "32", "--epochs", "1", "--batch-size", "8",
                     "--class-weight", "auto", "--cache-dir", str(tmp_path / "cache"),
                     "--out", str(run)])
    out, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    counts = metrics["counts"]
    assert counts["found"] == files_on_disk(root) == len(expected)
    assert counts["used"] + counts["skipped"] + counts["ignored"] == counts["found"]
    assert counts["train"] + counts["val"] + counts["test"] == counts["used"]
    split = json.loads((run / "split.json").read_text())
    assert {item["path"]: item["reason"] for item in split["skipped"]} == {
        path: fate for path, fate in expected.items() if fate not in ("used", "ignored")}
    assert sorted(split["ignored"]) == sorted(p for p, f in expected.items() if f == "ignored")
    assert len(metrics["class_weight"]) == 3 and metrics["class_weight"][2] > 1  # fox is rare

    def probabilities(files):
        assert cli.main(["predict", *[str(root / f) for f in files], "--model", str(run),
                         "--json", "--top-k", "3"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        return [{p["label"]: p["probability"] for p in line["predictions"]} for line in lines]

    rotated, upright, alpha, alpha_webp, on_white, cmyk, source = probabilities([
        "cat/rotated_6.jpg", "cat/upright.png", "cat/alpha.png", "cat/alpha.webp",
        "cat/alpha_on_white.png", "cat/cmyk.jpg", "cat/cmyk_source.png"])
    for label in ("cat", "dog", "fox"):
        assert rotated[label] == pytest.approx(upright[label], abs=1e-5)
        assert alpha[label] == pytest.approx(on_white[label], abs=1e-3)
        assert alpha_webp[label] == pytest.approx(on_white[label], abs=1e-3)
        assert cmyk[label] == pytest.approx(source[label], abs=0.02)
    # The pixels behind those predictions, and the SavedModel, which decodes in its graph.
    pixels = {name: decoding.decode_image((root / name).read_bytes(), 32).numpy() for name in
              ("cat/rotated_6.jpg", "cat/upright.png", "cat/alpha.png", "cat/alpha_on_white.png")}
    np.testing.assert_allclose(pixels["cat/rotated_6.jpg"], pixels["cat/upright.png"], atol=1e-3)
    np.testing.assert_allclose(pixels["cat/alpha.png"], pixels["cat/alpha_on_white.png"],
                               atol=0.51)
    served = tf.saved_model.load(str(run / "saved_model")).signatures["serving_default"]
    out = served(images=tf.constant([(root / name).read_bytes() for name in
                                     ("cat/rotated_6.jpg", "cat/upright.png", "cat/huge.jpg")]))
    np.testing.assert_allclose(out["probabilities"][0], out["probabilities"][1], atol=1e-5)
    np.testing.assert_allclose(out["probabilities"][0].numpy(),
                               [rotated[label] for label in ("cat", "dog", "fox")], atol=1e-5)


# --- Class weights, pixel limit, TFDS -------------------------------------------------------

def test_balanced_class_weights_and_their_effect_on_training(tmp_path):
    import tensorflow as tf


    labels = np.array([0] * 30 + [1] * 10)
    weights = fit.balanced_class_weights(labels, 3)
    assert weights == {0: pytest.approx(40 / 90), 1: pytest.approx(40 / 30), 2: 1.0}

    # Overlapping classes: the weighted loss moves the decision towards the rare class.
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (300, 4)), rng.normal(0.5, 1, (30, 4))])
    labels = np.array([0] * 300 + [1] * 30, dtype=np.int32)

    def load(idx, epoch=None):
        return tf.gather(features, idx), tf.one_hot(tf.gather(labels, idx), 2)

    def rare_predicted(class_weight):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
        settings = fit.Settings(epochs=20, batch_size=32, lr=0.05, seed=0,
                                     class_weight=class_weight)
        folder = tmp_path / str(class_weight is None)
        fit.fit_stage("head", model, settings, len(labels), load, None,
                           checkpoint.Checkpoint(folder, model))
        return int((model.predict(features, verbose=0).argmax(1) == 1).sum())

    assert rare_predicted(fit.balanced_class_weights(labels, 2)) > rare_predicted(None) + 30


@pytest.mark.parametrize("flag, value, message", [
    ("--class-weight", "balanced", "class_weight='balanced'"),
    ("--max-pixels", "0", "max_pixels=0"),
])
def test_bad_class_weight_and_pixel_limit_exit_2(tmp_path, capsys, flag, value, message):
    data = make_folder(tmp_path / "data", per_class=3, classes={"cat": 0, "dog": 0.3})
    code = cli.main(["train", str(data), "--weights", "none", flag, value, "--out",
                     str(tmp_path / "run")])
    assert code == 2 and message in capsys.readouterr().err


def test_tfds_offline_download_failure_is_a_clear_user_error(tmp_path, monkeypatch, capsys):
    import tensorflow_datasets as tfds

    def offline(self, *args, **kwargs):
        raise ConnectionError("Failed to establish a new connection: [Errno -3] "
                              "Temporary failure in name resolution")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(UserInputError, match="Could not load TFDS dataset 'mnist'.*network"):
        scan.resolve_data("tfds:mnist", tmp_path / "cache")
    code = cli.main(["train", "tfds:mnist", "--weights", "none", "--cache-dir",
                     str(tmp_path / "cache"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "name resolution" in err and "Traceback" not in err
    assert not (tmp_path / "cache" / "tfds" / "mnist").exists()


def test_tfds_dataset_with_differently_named_features(tmp_path):
    import tensorflow_datasets as tfds

    # smallnorb: features image, image2, label_category, instance, ...;
    # supervised_keys = ("image", "label_category").
    with tfds.testing.mock_data(num_examples=4):
        root = scan.resolve_data("tfds:smallnorb", tmp_path / "cache")
        names = tfds.builder("smallnorb").info.features["label_category"].names
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert classes == [f"{i}_{name}" for i, name in enumerate(names)]
    assert len(list((root / "train").rglob("*.png"))) == 4
    first = next((root / "train").rglob("*.png"))
    assert Image.open(first).size == (96, 96)  # the "image" feature, not "image2"


def test_given_splits_are_kept_and_their_overlap_reported(tmp_path):
    for split in ("train", "test"):  # the same 4 images per class in train/ and test/
        make_folder(tmp_path / "data" / split, per_class=4, classes={"cat": 0, "dog": 0.3})
    scanned = scan.scan_folder(tmp_path / "data")
    assert all(s.path.startswith(s.split + "/") or s.split == "val" for s in scanned.samples)
    assert len(scanned.split("test")) == 8 and len(scanned.split("train")) >= 4
    assert any("8 image(s) appear in more than one of the given" in w for w in scanned.warnings)


def test_config_pixel_limit_default_is_the_decoders():
    from tlapp.data import decoding
    from tlapp.config import Config

    assert Config().max_pixels == decoding.DEFAULT_MAX_PIXELS == constants.DEFAULT_MAX_PIXELS


def test_ordered_batches_of_a_multi_batch_loader_keep_their_count_so_keras_does_not_warn():
    """Regression: rebatch() lost the batch count, and every evaluation warned "Your input
    ran out of data" (Keras read until the end of a dataset of unknown size)."""
    from tlapp.data import datasets

    def load(indices):
        x = tf.cast(tf.reshape(indices, [-1, 1]), tf.float32)
        return x, tf.one_hot(indices % 2, 2)
    load.read_rows = 12  # three batches of 4 per call: the rebatch path

    dataset = datasets.ordered_batches(load, 19, 4)
    assert int(dataset.cardinality()) == 5
    assert [int(x[0, 0]) for x, _ in dataset] == [0, 4, 8, 12, 16]
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(loss="categorical_crossentropy")
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.evaluate(dataset, verbose=0)
    assert not [w for w in caught if "ran out of data" in str(w.message)]
