import errno
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.conftest import make_folder, write_image
from tlapp import cli
from tlapp.data import decoding, scan
from tlapp.features import cache as cache_lib
from tlapp.features.loader import FeatureLoader
from tlapp.features.extract import extract_features
from tlapp.errors import UserInputError

SIZE = 16


def tiny_stem(spatial=True):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs / 255.0)
    if not spatial:
        x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, x)


def key(stem, **extra):
    return cache_lib.entry_key(backbone="tiny", weights=cache_lib.weights_identity(stem),
                               cut="conv", image_size=SIZE, dtype="float32", views=1) | extra


def files_of(folder):
    scanned = scan.scan_folder(folder)
    return {s.sha256: scanned.root / s.path for s in scanned.samples}, scanned


def all_rows(feature_cache, digests, epoch=None):
    load = FeatureLoader(feature_cache, digests, np.zeros(len(digests), np.int32), 2)
    rows, _ = load(np.arange(len(digests), dtype=np.int64), epoch)
    return np.asarray(rows)


def reference_rows(stem, files):
    pixels = np.stack([decoding.decode_image(files[d].read_bytes(), SIZE) for d in files])
    return np.asarray(stem(pixels))


@pytest.mark.slow
def test_rows_equal_the_stem_and_reads_stream(tmp_path):
    files, _ = files_of(make_folder(tmp_path / "data", per_class=6))
    stem = tiny_stem()
    feature_cache = cache_lib.FeatureCache(tmp_path / "cache", key(stem), shard_bytes=1)
    stats = extract_features(feature_cache, stem, files, SIZE, batch_size=4)
    assert stats == {"extracted": 18, "reused": 0, "repaired": 0}
    manifest = cache_lib.read_manifest(feature_cache.dir)
    assert sorted(len(s["rows"]) for s in manifest["shards"]) == [2, 4, 4, 4, 4]
    digests = list(files)
    np.testing.assert_allclose(all_rows(feature_cache, digests), reference_rows(stem, files),
                               rtol=1e-5, atol=1e-5)
    # the streaming reader reads the rows of a batch and nothing else
    load = FeatureLoader(feature_cache, digests, np.zeros(18, np.int32), 2)
    row_bytes = SIZE * SIZE * 8 * 4
    load(np.array([3, 11, 7], np.int64))
    assert load.reader.bytes_read == 3 * row_bytes
    load(np.array([0], np.int64))
    assert load.reader.bytes_read == 4 * row_bytes


@pytest.mark.slow
def test_float16_spatial_round_trip(tmp_path):
    files, _ = files_of(make_folder(tmp_path / "data", per_class=3))
    stem = tiny_stem()
    feature_cache = cache_lib.FeatureCache(tmp_path / "cache", key(stem, dtype="float16"))
    extract_features(feature_cache, stem, files, SIZE)
    shard = next(feature_cache.dir.glob("shard-*.npy"))
    assert np.load(shard, allow_pickle=False).dtype == np.float16
    np.testing.assert_allclose(all_rows(feature_cache, list(files)), reference_rows(stem, files),
                               rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_incremental_add_edit_remove(tmp_path):
    folder = make_folder(tmp_path / "data", per_class=4)
    stem = tiny_stem()

    def extract():
        files, _ = files_of(folder)
        feature_cache = cache_lib.FeatureCache(tmp_path / "cache", key(stem))
        return extract_features(feature_cache, stem, files, SIZE), feature_cache, files

    assert extract()[0]["extracted"] == 12
    write_image(folder / "cat" / "new.png", 0.1, np.random.default_rng(7))
    assert extract()[0] == {"extracted": 1, "reused": 12, "repaired": 0}
    write_image(folder / "dog" / "dog_00.png", 0.9, np.random.default_rng(8))  # edited
    assert extract()[0] == {"extracted": 1, "reused": 12, "repaired": 0}
    (folder / "fox" / "fox_01.jpg").unlink()
    stats, feature_cache, files = extract()
    assert stats == {"extracted": 0, "reused": 12, "repaired": 0}
    np.testing.assert_allclose(all_rows(feature_cache, list(files)),
                               reference_rows(stem, files), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_flipped_byte_is_found_and_repaired(tmp_path, capsys, caplog):
    files, _ = files_of(make_folder(tmp_path / "data", per_class=4))
    stem = tiny_stem()
    feature_cache = cache_lib.FeatureCache(tmp_path / "cache", key(stem), shard_bytes=1)
    extract_features(feature_cache, stem, files, SIZE, batch_size=4)
    shard = sorted(feature_cache.dir.glob("shard-*.npy"))[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40
    shard.write_bytes(bytes(data))
    assert cache_lib.verify_entry(feature_cache.dir) == [(shard.name, "checksum mismatch")]
    assert cli.main(["cache", "verify", "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "checksum mismatch" in capsys.readouterr().out

    again = cache_lib.FeatureCache(tmp_path / "cache", key(stem))
    stats = extract_features(again, stem, files, SIZE)
    assert "is damaged (checksum mismatch); its 4 rows will be extracted again" in \
        caplog.text
    assert stats == {"extracted": 4, "reused": 8, "repaired": 4}
    assert cache_lib.verify_entry(again.dir) == []
    np.testing.assert_allclose(all_rows(again, list(files)), reference_rows(stem, files),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_truncated_shard_is_found(tmp_path):
    files, _ = files_of(make_folder(tmp_path / "data", per_class=2))
    stem = tiny_stem()
    feature_cache = cache_lib.FeatureCache(tmp_path / "cache", key(stem))
    extract_features(feature_cache, stem, files, SIZE)
    shard = next(feature_cache.dir.glob("shard-*.npy"))
    shard.write_bytes(shard.read_bytes()[:-100])
    assert "truncated" in cache_lib.verify_entry(feature_cache.dir)[0][1]
    again = cache_lib.FeatureCache(tmp_path / "cache", key(stem))
    assert extract_features(again, stem, files, SIZE)["extracted"] == 6


@pytest.mark.slow
def test_disk_full_leaves_no_partial_entry(tmp_path, monkeypatch):
    files, _ = files_of(make_folder(tmp_path / "data", per_class=4))
    stem = tiny_stem()
    feature_cache = cache_lib.FeatureCache(tmp_path / "cache", key(stem), shard_bytes=1)
    real_save, calls = np.save, []

    def save_until_full(f, array):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(f, array)

    monkeypatch.setattr(np, "save", save_until_full)
    with pytest.raises(UserInputError, match="disk holding the feature cache is full"):
        extract_features(feature_cache, stem, files, SIZE, batch_size=4)
    manifest = cache_lib.read_manifest(feature_cache.dir)
    assert len(manifest["shards"]) == 1  # only the complete shard is listed
    assert not [p for p in feature_cache.dir.iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(np, "save", real_save)
    again = cache_lib.FeatureCache(tmp_path / "cache", key(stem))
    assert extract_features(again, stem, files, SIZE)["extracted"] == 8


EXTRACT = """
import sys, time
sys.path.insert(0, {root!r})
from tests.test_cache import tiny_stem, key, files_of, SIZE
from tlapp.features import cache as cache_lib
from tlapp.data import decoding
from tlapp.data import scan
from tlapp.features.extract import extract_features
from pathlib import Path
real = cache_lib.FeatureCache.write_shard
def slow(self, *args, **kwargs):
    real(self, *args, **kwargs)
    print("shard", flush=True)
    time.sleep({pause})
cache_lib.FeatureCache.write_shard = slow
files, _ = files_of(Path({data!r}))
stem = tiny_stem()
c = cache_lib.FeatureCache(Path({cache!r}), key(stem), shard_bytes=1)
extract_features(c, stem, files, SIZE, batch_size=4)
print("done", flush=True)
"""


def extraction_process(tmp_path, cache, pause):
    script = EXTRACT.format(root=os.getcwd(), data=str(tmp_path / "data"), cache=str(cache),
                            pause=pause)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_rows(tmp_path):
    files, _ = files_of(make_folder(tmp_path / "data", per_class=6))
    process = extraction_process(tmp_path, tmp_path / "killed", pause=30)
    assert process.stdout.readline().strip() == "shard"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    stem = tiny_stem()
    resumed = cache_lib.FeatureCache(tmp_path / "killed", key(stem), shard_bytes=1)
    stats = extract_features(resumed, stem, files, SIZE, batch_size=4)
    assert stats["reused"] == 4 and stats["extracted"] == 14
    whole = cache_lib.FeatureCache(tmp_path / "whole", key(stem), shard_bytes=1)
    extract_features(whole, stem, files, SIZE, batch_size=4)
    np.testing.assert_array_equal(all_rows(resumed, list(files)), all_rows(whole, list(files)))
    assert cache_lib.verify_entry(resumed.dir) == []


@pytest.mark.slow
def test_two_processes_extracting_one_entry(tmp_path):
    files, _ = files_of(make_folder(tmp_path / "data", per_class=6))
    processes = [extraction_process(tmp_path, tmp_path / "cache", pause=0.05) for _ in range(2)]
    for process in processes:
        assert process.communicate(timeout=300)[0].strip().endswith("done")
    stem = tiny_stem()
    shared = cache_lib.FeatureCache(tmp_path / "cache", key(stem))
    assert cache_lib.verify_entry(shared.dir) == []
    assert extract_features(shared, stem, files, SIZE)["extracted"] == 0
    np.testing.assert_allclose(all_rows(shared, list(files)), reference_rows(stem, files),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_augmented_views(tmp_path):
    files, _ = files_of(make_folder(tmp_path / "data", per_class=2))
    stem = tiny_stem()
    views_key = key(stem, views=3, augment="flip,color=30", augment_seed=0)
    feature_cache = cache_lib.FeatureCache(tmp_path / "cache", views_key)
    assert extract_features(feature_cache, stem, files, SIZE)["extracted"] == 18
    digests = list(files)
    view0 = all_rows(feature_cache, digests)
    np.testing.assert_allclose(view0, reference_rows(stem, files), rtol=1e-5, atol=1e-5)
    epochs = [all_rows(feature_cache, digests, epoch=e) for e in range(4)]
    for a, b in zip(epochs, epochs[1:]):
        assert not np.allclose(a, b)  # a different view every epoch
    np.testing.assert_array_equal(epochs[0], epochs[3])  # three views, cycled
    again = cache_lib.FeatureCache(tmp_path / "cache", views_key)
    assert extract_features(again, stem, files, SIZE)["extracted"] == 0


@pytest.mark.slow
def test_cache_commands(tmp_path, capsys):
    files, _ = files_of(make_folder(tmp_path / "data", per_class=2))
    stem = tiny_stem()
    for size_key in (key(stem), key(stem, dtype="float16")):
        extract_features(cache_lib.FeatureCache(tmp_path / "cache", size_key), stem, files,
                         SIZE)
    folder = ["--cache-dir", str(tmp_path / "cache")]
    assert cli.main(["cache", "list", *folder]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and "backbone tiny" in out and "6 rows" in out
    assert cli.main(["cache", "verify", *folder]) == 0
    assert cli.main(["cache", "clear", *folder]) == 2
    assert "Say what to clear" in capsys.readouterr().err
    assert cli.main(["cache", "clear", "nope", *folder]) == 2
    assert cli.main(["cache", "clear", "--older-than", "1", *folder]) == 0
    assert len(cache_lib.list_entries(tmp_path / "cache")) == 2
    assert cli.main(["cache", "clear", "--all", *folder]) == 0
    assert cache_lib.list_entries(tmp_path / "cache") == []
