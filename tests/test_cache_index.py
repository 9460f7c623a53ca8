"""The feature cache's append-only index: records per shard, their union, migration of
layout-2 entries, recovery from damage, concurrent writers, bytes written per shard."""
import hashlib
import json
import multiprocessing
import os
import zipfile

import numpy as np
import pytest

from tlapp import cli
from tlapp.errors import UserInputError
from tlapp.features import cache as cache_lib, index as index_lib, records
from tlapp.features.loader import FeatureLoader

SHAPE = (6,)


def digest(i: int) -> str:
    return hashlib.sha256(f"image {i}".encode()).hexdigest()


def key(**extra) -> dict:
    return cache_lib.entry_key(backbone="tiny", weights="w" * 64, cut="conv", image_size=16,
                               dtype="float32", views=1) | extra


def features_of(digests: list[str], view: int = 0) -> np.ndarray:
    """Rows that depend only on the image (and view): what a deterministic stem gives."""
    seeds = [int(d[:8], 16) + view for d in digests]
    return np.stack([np.random.default_rng(s).normal(size=SHAPE) for s in seeds]
                    ).astype(np.float32)


def fill(feature_cache, first: int, count: int, per_shard: int = 4) -> list[str]:
    digests = [digest(i) for i in range(first, first + count)]
    for start in range(0, count, per_shard):
        chunk = digests[start:start + per_shard]
        feature_cache.write_shard([cache_lib.row_key(d, 0) for d in chunk], features_of(chunk))
    return digests


def read_all(feature_cache, digests) -> np.ndarray:
    with FeatureLoader(feature_cache, digests, np.zeros(len(digests), np.int32), 2) as loader:
        return loader.gather(np.arange(len(digests)))


def folder_state(folder) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
            for p in folder.iterdir()}


def test_rows_round_trip_and_reopen(tmp_path):
    feature_cache = cache_lib.FeatureCache(tmp_path, key())
    digests = fill(feature_cache, 0, 10)
    assert feature_cache.missing(digests + [digest(99)]) == [(digest(99), 0)]
    np.testing.assert_array_equal(read_all(feature_cache, digests), features_of(digests))
    again = cache_lib.FeatureCache(tmp_path, key())
    assert again.rows == 10 and again.feature_shape == SHAPE
    order = digests[::-1]  # any order, duplicates too
    np.testing.assert_array_equal(read_all(again, order + order[:2]),
                                  features_of(order + order[:2]))
    assert cache_lib.verify_entry(again.dir) == []
    names = {p.name for p in again.dir.iterdir()}
    assert names == {s.name for s in again.shards} | {
        s.name[:-4] + ".rows" for s in again.shards}


def test_views_are_separate_rows(tmp_path):
    feature_cache = cache_lib.FeatureCache(tmp_path, key(views=2))
    digests = [digest(i) for i in range(3)]
    assert len(feature_cache.missing(digests)) == 6
    feature_cache.write_shard([cache_lib.row_key(d, v) for v in (0, 1) for d in digests],
                              np.concatenate([features_of(digests, 0), features_of(digests, 1)]))
    shards, rows = feature_cache.locate(digests)
    assert shards.shape == (3, 2)
    with FeatureLoader(feature_cache, digests, np.zeros(3, np.int32), 2) as loader:
        np.testing.assert_array_equal(loader.gather(np.arange(3), np.ones(3, np.int64)),
                                      features_of(digests, 1))


def test_bytes_written_per_shard_stay_constant_as_the_entry_grows(tmp_path):
    """No file that holds every row is rewritten per shard: each shard adds its own file and
    its own record, of the same size whether the entry holds 4 rows or 400."""
    feature_cache = cache_lib.FeatureCache(tmp_path, key())
    written = []
    for i in range(100):
        before = folder_state(feature_cache.dir) if feature_cache.dir.exists() else {}
        fill(feature_cache, 4 * i, 4)
        after = folder_state(feature_cache.dir)
        changed = {name: after[name][0] for name in after if before.get(name) != after[name]}
        assert len(changed) == 2 and all(name.startswith("shard-") for name in changed)
        written.append(sum(changed.values()))
    assert max(written) - min(written) <= 16  # digits of an mtime, nothing that grows
    # Opening rewrites nothing unless the snapshot is stale; then once, not per shard.
    cache_lib.FeatureCache(tmp_path, key())
    assert (feature_cache.dir / index_lib.SNAPSHOT).is_file()
    state = folder_state(feature_cache.dir)
    again = cache_lib.FeatureCache(tmp_path, key())
    again.touch()
    changed = [n for n, v in folder_state(feature_cache.dir).items() if state.get(n) != v]
    assert changed in ([], ["last_used"])
    assert again.rows == 400


def _writer(root, first, count, pause_file):
    feature_cache = cache_lib.FeatureCache(root, key())
    fill(feature_cache, first, count)


@pytest.mark.slow
def test_concurrent_writers_lose_no_rows_and_list_each_shard_once(tmp_path):
    """Two processes write overlapping rows into one entry at once (the same shards, under
    the same names, and others); no lock, nothing lost, nothing listed twice."""
    context = multiprocessing.get_context("fork")  # the children use numpy only
    writers = [context.Process(target=_writer, args=(tmp_path, first, 200, None))
               for first in (0, 100)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(60)
        assert process.exitcode == 0
    feature_cache = cache_lib.FeatureCache(tmp_path, key())
    digests = [digest(i) for i in range(300)]
    assert feature_cache.missing(digests) == []
    np.testing.assert_array_equal(read_all(feature_cache, digests), features_of(digests))
    (entry,) = cache_lib.list_entries(tmp_path)
    on_disk = sum(p.stat().st_size for p in feature_cache.dir.glob("shard-*.npy"))
    assert entry["rows"] == 300 and entry["bytes"] == on_disk and entry["problems"] == []
    assert len(feature_cache.shards) == len(set(feature_cache.shard_names)) == 75


def write_layout_2(folder, digests, per_shard=4, last_used=1_600_000_000.0) -> dict:
    """An entry as tlapp wrote it before records existed: shards and one manifest.json."""
    folder.mkdir(parents=True)
    manifest = {"key": key(), "feature_shape": list(SHAPE), "dtype": "float32",
                "created": last_used, "shards": [], "last_used": last_used}
    for start in range(0, len(digests), per_shard):
        rows = digests[start:start + per_shard]
        name = f"shard-{hashlib.sha256(''.join(rows).encode()).hexdigest()[:16]}.npy"
        np.save(folder / name, features_of(rows))
        stat = (folder / name).stat()
        manifest["shards"].append({"file": name, "sha256": cache_lib.file_sha256(folder / name),
                                   "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                   "rows": rows})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_layout_2_entry_is_read_as_is_then_migrated(tmp_path, caplog):
    digests = [digest(i) for i in range(10)]
    entry = cache_lib.entry_dir(tmp_path, key())
    write_layout_2(entry, digests)
    listed = cache_lib.list_entries(tmp_path)  # read as is, nothing written
    assert [(e["rows"], e["key"]["backbone"]) for e in listed] == [(10, "tiny")]
    assert (entry / "manifest.json").is_file() and not list(entry.glob("*.rows"))
    assert cache_lib.verify_entry(entry) == []

    caplog.set_level("INFO", "tlapp")
    feature_cache = cache_lib.FeatureCache(tmp_path, key())
    assert "converted to the record layout (3 shards)" in caplog.text
    assert feature_cache.missing(digests) == [] and feature_cache.repaired == 0
    np.testing.assert_array_equal(read_all(feature_cache, digests), features_of(digests))
    assert not (entry / "manifest.json").exists() and len(list(entry.glob("*.rows"))) == 3
    assert index_lib.last_used(entry) == pytest.approx(1_600_000_000.0)
    assert cache_lib.verify_entry(entry) == []
    fill(feature_cache, 10, 4)  # and it grows like any entry
    assert cache_lib.FeatureCache(tmp_path, key()).rows == 14


def test_damaged_manifest_never_locks_the_user_out(tmp_path, capsys, caplog):
    """Issue 13, item 4: one bad byte in manifest.json; list, verify, clear and a run all
    work, the damage is reported, and the rows are extracted again."""
    digests = [digest(i) for i in range(8)]
    entry = cache_lib.entry_dir(tmp_path, key())
    write_layout_2(entry, digests)
    text = (entry / "manifest.json").read_text()
    (entry / "manifest.json").write_text(text[:40] + "\x00" + text[41:])
    folder = ["--cache-dir", str(tmp_path)]
    assert cli.main(["cache", "list", *folder]) == 0
    out = capsys.readouterr().out
    assert entry.name in out and "damaged: manifest.json" in out
    assert cli.main(["cache", "verify", *folder]) == 2
    assert "manifest.json: damaged" in capsys.readouterr().out

    feature_cache = cache_lib.FeatureCache(tmp_path, key())
    assert "manifest.json of" in caplog.text and "is damaged" in caplog.text
    assert len(feature_cache.missing(digests)) == 8  # unattributable: extracted again
    assert not list(entry.glob("shard-*.npy")) and not (entry / "manifest.json").exists()
    fill(feature_cache, 0, 8)
    assert cache_lib.verify_entry(entry) == []

    for clear in (["--older-than", "0"], [entry.name], ["--all"]):
        write_layout_2(entry, digests) if not entry.exists() else None
        (entry / "manifest.json").write_text("{not json")
        assert cli.main(["cache", "clear", *clear, *folder]) == 0
        assert not entry.exists()


def test_damaged_record_drops_its_shard(tmp_path, caplog):
    feature_cache = cache_lib.FeatureCache(tmp_path, key())
    digests = fill(feature_cache, 0, 8)
    record = sorted(feature_cache.dir.glob("*.rows"))[0]
    data = bytearray(record.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the keys: the zip's CRC no longer matches
    record.write_bytes(bytes(data))
    assert [f for f, _ in cache_lib.verify_entry(feature_cache.dir)] == [record.name]
    again = cache_lib.FeatureCache(tmp_path, key())
    assert again.repaired == 0 and len(again.missing(digests)) == 4
    assert "is damaged (unreadable record" in caplog.text
    assert not record.exists() and not (again.dir / (record.stem + ".npy")).exists()


def test_rows_attributed_to_the_wrong_images_are_caught(tmp_path, caplog):
    """Issue 13, item 5: a valid record (or manifest) with two row hashes swapped."""
    feature_cache = cache_lib.FeatureCache(tmp_path, key())
    digests = fill(feature_cache, 0, 8)
    record = sorted(feature_cache.dir.glob("*.rows"))[0]
    shard, keys, meta = records.read_record(record)
    swapped = keys.copy()
    swapped[[0, 1]] = keys[[1, 0]]
    forged = shard.__class__(**{**shard.__dict__, "rows_sha256": records.rows_sha256(swapped)})
    records.write_record(feature_cache.dir, forged, swapped, meta)  # a consistent record
    problems = cache_lib.verify_entry(feature_cache.dir)
    assert problems == [(record.name, "its row list does not match the shard (rows "
                                      "attributed to other images)")]
    assert len(cache_lib.FeatureCache(tmp_path, key()).missing(digests)) == 4

    entry = cache_lib.entry_dir(tmp_path / "old", key())
    manifest = write_layout_2(entry, digests)
    rows = manifest["shards"][1]["rows"]
    rows[0], rows[1] = rows[1], rows[0]
    (entry / "manifest.json").write_text(json.dumps(manifest))
    assert "rows attributed to other images" in dict(cache_lib.verify_entry(entry))[
        manifest["shards"][1]["file"]]
    migrated = cache_lib.FeatureCache(tmp_path / "old", key())
    assert sorted(p for p, _ in migrated.missing(digests)) == sorted(rows)
    np.testing.assert_array_equal(read_all(migrated, digests[:4]), features_of(digests[:4]))


def test_damaged_snapshot_is_rebuilt(tmp_path, caplog):
    feature_cache = cache_lib.FeatureCache(tmp_path, key())
    digests = fill(feature_cache, 0, 4 * index_lib.SNAPSHOT_MIN_NEW, per_shard=4)
    cache_lib.FeatureCache(tmp_path, key())
    snapshot = feature_cache.dir / index_lib.SNAPSHOT
    assert zipfile.is_zipfile(snapshot)
    snapshot.write_bytes(snapshot.read_bytes()[:100])
    again = cache_lib.FeatureCache(tmp_path, key())
    assert again.missing(digests) == [] and again.repaired == 0
    assert "index.npz of" in caplog.text
    assert records.read_snapshot(snapshot)[1].shape == (len(digests),)  # written anew


def entry_with_a_nan_edit_keeping_the_mtime(tmp_path, shard_index: int):
    """An entry of 8 rows (2 shards) whose shard `shard_index` has a NaN written into it,
    its size and mtime as before; returns (digests, that shard's path)."""
    feature_cache = cache_lib.FeatureCache(tmp_path, key())
    digests = fill(feature_cache, 0, 8)
    shard = feature_cache.dir / feature_cache.shards[shard_index].name
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-4 * SHAPE[0]:] = b"\xff" * 4 * SHAPE[0]  # NaN
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return digests, shard


def test_edited_shard_with_restored_mtime_is_caught_when_read(tmp_path):
    """Issue 13, item 5: bytes changed, size and mtime as before. The fast path cannot see
    it, nor the check before training (the shard was checked when written: issue 14); the
    read does (non-finite values), removes the shard and says so."""
    digests, shard = entry_with_a_nan_edit_keeping_the_mtime(tmp_path, 0)
    again = cache_lib.FeatureCache(tmp_path, key())
    assert again.missing(digests) == []  # not seen when opening (no checksum unless changed)
    with FeatureLoader(again, digests, np.zeros(8, np.int32), 2) as loader:
        assert loader.check_rows() == 0
        with pytest.raises(cache_lib.DamagedCacheError, match="non-finite values"):
            loader.gather(np.arange(8))
    assert not shard.exists()
    assert len(cache_lib.FeatureCache(tmp_path, key()).missing(digests)) == 4


def test_non_finite_activations_are_never_stored(tmp_path):
    feature_cache = cache_lib.FeatureCache(tmp_path, key(dtype="float16"))
    rows = features_of([digest(0), digest(1)]).astype(np.float16)
    rows[1, 0] = np.inf
    with pytest.raises(UserInputError, match="--cache-dtype float32"):
        feature_cache.write_shard([digest(0), digest(1)], rows)
    assert not feature_cache.dir.exists() or not list(feature_cache.dir.iterdir())


def test_short_write_on_a_full_disk(tmp_path, monkeypatch):
    """numpy's short write (no errno) is a full disk: one message naming the folder and the
    space needed; no temporary file, nothing listed that is not whole."""
    feature_cache = cache_lib.FeatureCache(tmp_path, key())
    digests = fill(feature_cache, 0, 4)
    real_save = np.save

    def short_write(f, array):
        f.write(b"\x93NUMPY partial")
        raise OSError(f"{array.nbytes} requested and 14 written")

    monkeypatch.setattr(np, "save", short_write)
    with pytest.raises(UserInputError, match=r"disk holding the feature cache is full .*"
                                             r"About 0\.\d+ GiB more are needed"):
        feature_cache.write_shard([digest(9)], features_of([digest(9)]), bytes_left=2**20)
    monkeypatch.setattr(np, "save", real_save)
    assert not [p for p in feature_cache.dir.iterdir() if records.TEMP_MARK in p.name]
    again = cache_lib.FeatureCache(tmp_path, key())
    assert again.missing(digests + [digest(9)]) == [(digest(9), 0)]
    assert cache_lib.verify_entry(again.dir) == []


def forget_finite_check(entry, shard_names) -> None:
    """Rewrites records as the code before issue 14 wrote them: without "finite"."""
    for name in shard_names:
        path = records.record_path(entry, name)
        with np.load(path) as stored:
            keys, meta = stored["keys"], json.loads(stored["meta"].tobytes())
        meta.pop("finite")
        records.publish(path, records.save_arrays({"keys": keys,
                                                   "meta": records.json_array(meta)}))


@pytest.mark.parametrize("shards", [3, index_lib.SNAPSHOT_MIN_NEW + 1])  # with a snapshot
def test_rows_are_checked_for_non_finite_values_once_per_shard(tmp_path, shards):
    """Issue 14: shards written now were checked when written; older ones are read whole
    by the first run that uses them, then recorded as checked: no run reads them again."""
    feature_cache = cache_lib.FeatureCache(tmp_path, key())
    digests = fill(feature_cache, 0, 2 * shards, per_shard=2)
    assert all(shard.finite for shard in feature_cache.shards)
    cache_lib.FeatureCache(tmp_path, key())  # writes the snapshot when there are enough
    assert (feature_cache.dir / index_lib.SNAPSHOT).exists() == (shards > 3)

    def rows_checked(subset):
        opened = cache_lib.FeatureCache(tmp_path, key())
        with FeatureLoader(opened, subset, np.zeros(len(subset), np.int32), 2) as loader:
            return loader.check_rows(), loader.reader.bytes_read

    assert rows_checked(digests) == (0, 0)
    forget_finite_check(feature_cache.dir, feature_cache.shard_names)
    if shards > 3:  # and the snapshot that covers them says nothing either
        listed, keys, meta = records.read_snapshot(feature_cache.dir / index_lib.SNAPSHOT)
        arrays = records.snapshot_arrays(listed, keys, meta)
        del arrays["finite"]
        records.publish(feature_cache.dir / index_lib.SNAPSHOT, records.save_arrays(arrays))
    assert not any(s.finite for s in cache_lib.FeatureCache(tmp_path, key()).shards)
    row_bytes = 4 * SHAPE[0]
    assert rows_checked(digests[:1]) == (2, 2 * row_bytes)  # its whole shard, once
    assert rows_checked(digests) == (2 * shards - 2, (2 * shards - 2) * row_bytes)
    assert rows_checked(digests) == (0, 0)
    assert all(s.finite for s in cache_lib.FeatureCache(tmp_path, key()).shards)
    assert cache_lib.verify_entry(feature_cache.dir) == []


def test_migrated_layout_2_shards_are_checked_once(tmp_path):
    digests = [digest(i) for i in range(10)]
    write_layout_2(cache_lib.entry_dir(tmp_path, key()), digests)
    for expected in (10, 0):
        opened = cache_lib.FeatureCache(tmp_path, key())
        with FeatureLoader(opened, digests, np.zeros(10, np.int32), 2) as loader:
            assert loader.check_rows() == expected


def test_damage_found_while_tf_data_reads_is_the_cache_message(tmp_path):
    """Issue 14: with the check before training skipped for checked shards, an edit that
    kept the shard's mtime is found by the reads of training, inside tf.data: the run
    stops with the loader's DamagedCacheError, not TensorFlow's wrapped error."""
    from tlapp.data import datasets
    from tlapp.pipeline import stages

    digests, shard = entry_with_a_nan_edit_keeping_the_mtime(tmp_path, 1)
    again = cache_lib.FeatureCache(tmp_path, key())
    with FeatureLoader(again, digests, np.zeros(8, np.int32), 2) as loader:
        with pytest.raises(cache_lib.DamagedCacheError, match="non-finite values"):
            with stages.damage_reported({"train": loader}):
                for _ in datasets.ordered_batches(loader, 8, 4):
                    pass
    assert not shard.exists()
