import json
import random

import numpy as np
import pytest

from tests.conftest import make_folder, write_image
from tlapp import data as data_lib
from tlapp.config import UserInputError


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

    scanned = data_lib.scan_folder(image_folder, verbose=False)

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
    assert set(split) == {"train", "val", "test", "skipped"}
    assert sum(len(split[k]) for k in ("train", "val", "test")) == 25


def test_adding_files_keeps_every_existing_file_in_its_split(tmp_path):
    root = make_folder(tmp_path / "data", per_class=30)
    before = splits_of(data_lib.scan_folder(root, verbose=False))
    rng = np.random.default_rng(5)
    for i in range(10):
        write_image(root / "dog" / f"new_{i}.png", 0.33, rng)
    after = splits_of(data_lib.scan_folder(root, verbose=False))
    assert len(after) == len(before) + 10
    assert {p: after[p] for p in before} == before


def test_assign_splits_is_stable_and_fills_val_and_test():
    rng = random.Random(0)
    for trial in range(200):
        paths = [f"c/{rng.random():.12f}.jpg" for _ in range(rng.randint(3, 12))]
        split = data_lib.assign_splits(paths, 0.1, 0.1)
        assert set(split.values()) == {"train", "val", "test"}, paths
        # a file's split depends on its own path except where a class needed filling
        natural = {p: data_lib.assign_splits([p] * 1, 0.1, 0.1)[p] for p in paths}
        moved = [p for p in paths if split[p] != natural[p]]
        assert len(moved) <= 2
    big = [f"c/{i}.jpg" for i in range(2000)]
    split = data_lib.assign_splits(big, 0.1, 0.2)
    fractions = {k: list(split.values()).count(k) / len(big) for k in ("val", "test")}
    assert abs(fractions["val"] - 0.1) < 0.03 and abs(fractions["test"] - 0.2) < 0.03


def test_presplit_layout_is_used_as_given(tmp_path):
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        make_folder(tmp_path / "data" / split, per_class=n, seed=n)
    scanned = data_lib.scan_folder(tmp_path / "data", verbose=False)
    assert scanned.classes == ["cat", "dog", "fox"]
    assert scanned.counts()["train"] == 18
    assert scanned.counts()["val"] == 6
    assert scanned.counts()["test"] == 9
    assert all(s.path.startswith(s.split + "/") for s in scanned.samples)


def test_presplit_without_val_carves_it_from_train(tmp_path):
    make_folder(tmp_path / "data" / "train", per_class=10)
    make_folder(tmp_path / "data" / "test", per_class=2, seed=3)
    scanned = data_lib.scan_folder(tmp_path / "data", verbose=False)
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
        data_lib.scan_folder(root, verbose=False)


def test_decode_image_formats_and_size(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    for ext in ("png", "jpg", "bmp", "gif", "webp"):
        path = tmp_path / f"x.{ext}"
        Image.fromarray(pixels).save(path)
        image = data_lib.decode_image(path.read_bytes(), 16)
        assert image.shape == (16, 16, 3) and image.dtype.name == "float32", ext
        assert 0 <= float(np.min(image)) and float(np.max(image)) <= 255


def test_expand_inputs(tmp_path, image_folder):
    files = data_lib.expand_inputs([str(image_folder / "cat"), str(image_folder / "dog/*.png"),
                                    str(tmp_path / "nope.jpg")])
    assert len(files) == 8 + 4 + 1 and files[-1].endswith("nope.jpg")


def test_split_json_round_trips(image_folder):
    scanned = data_lib.scan_folder(image_folder, verbose=False)
    assert json.loads(json.dumps(scanned.split_json()))["skipped"] == []
