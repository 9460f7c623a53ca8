"""The scan's decode check in batches (issue 14): one straight tf.data graph per kind of
file must fail exactly where the one-file check finds a problem, every bad file is reported
with its reason, and a window of large files is read a bounded number of bytes at a time."""
import os
import types

import pytest
import tensorflow as tf

from tests.test_data import make_messy_folder
from tlapp.constants import DEFAULT_MAX_PIXELS
from tlapp.data import checking, decode_checks, decoding, validation


@pytest.fixture(scope="module")
def messy_files(tmp_path_factory, huge_jpeg):
    root = tmp_path_factory.mktemp("messy")
    expected = make_messy_folder(root, huge_jpeg)
    return root, {relative: fate for relative, fate in expected.items()
                  if fate != "ignored" and os.path.isfile(root / relative)}


@pytest.mark.slow
def test_kind_check_fails_exactly_where_the_file_check_finds_a_problem(messy_files):
    root, expected = messy_files
    kinds = set()
    for relative in expected:
        data = (root / relative).read_bytes()
        if validation.precheck(data) is not None:
            continue  # empty, not an image, other formats: never sent to a pipeline
        kind = decoding.file_kind(data)
        kinds.add(kind)
        for limit in (DEFAULT_MAX_PIXELS, 1000):  # too large included
            alone = validation.check_image(data, limit)
            try:
                height, width, _ = validation.compiled_check(kind, limit)(tf.constant(data))
            except tf.errors.InvalidArgumentError:
                assert alone["reason"] is not None, (relative, limit)
                continue
            assert alone["reason"] is None, (relative, limit, alone)
            assert (int(height), int(width)) == (alone["height"], alone["width"]), relative
    assert kinds == set(decoding.KINDS)  # every kind met, 16-bit PNG included


@pytest.mark.slow
def test_check_files_equals_the_one_file_check_for_every_file(messy_files, tmp_path):
    root, expected = messy_files
    relative = sorted(expected)
    checks = checking.check_files(str(root), relative, cache_dir=tmp_path / "cache")
    for i, name in enumerate(relative):
        if expected[name] == "unreadable":
            assert checks.digests[i] is None and checks.problems[i][0] == "unreadable"
            continue
        alone = validation.verdict(validation.check_image((root / name).read_bytes()),
                                   DEFAULT_MAX_PIXELS)
        assert checks.problems.get(i) == ((alone["reason"], alone["detail"])
                                          if alone["reason"] else None), name
        assert checks.digests[i] is not None
    assert {reason for reason, _ in checks.problems.values()} == {
        fate for fate in expected.values() if fate != "used"}


def test_a_window_of_large_files_is_read_in_bounded_batches(monkeypatch):
    monkeypatch.setattr(checking, "READ_BYTES", 100)
    items = [(i, f"f{i}", types.SimpleNamespace(st_size=size))
             for i, size in enumerate([40, 40, 40, 250, 10, 90, 5])]
    batches = list(checking._read_batches(items))
    assert [[i for i, _, _ in batch] for batch in batches] == [[0, 1], [2], [3], [4, 5], [6]]
    assert all(sum(s.st_size for _, _, s in b) <= 100 or len(b) == 1 for b in batches)


def test_pipeline_keeps_no_file_contents_and_explains_failures_from_disk(tmp_path):
    """The decoder holds (index, hash, path) for files in flight, not their bytes; a file the
    pipeline drops is read again and judged alone."""
    good = tmp_path / "good.bmp"
    bad = tmp_path / "bad.bmp"
    header = bytes.fromhex("424d46000000000000003600000028000000020000000200000001001800"
                           "000000001000000000000000000000000000000000000000")
    good.write_bytes(header + bytes(16))
    bad.write_bytes(header[:30] + b"\xff" * 10)  # a BMP header cut short
    decoder = decode_checks.Decoder("bmp", DEFAULT_MAX_PIXELS)
    chunk = [(0, "a" * 64, str(good), good.read_bytes()),
             (1, "b" * 64, str(bad), bad.read_bytes())]
    decoder.put(chunk, lambda: None)
    decoder.close()
    results, done = [], False
    while not done:
        for message in decoder.finished(block=True):
            if message == ("done",):
                done = True
                break
            assert message[0] == "ok", message
            results += message[1]
    assert [(i, r["reason"]) for i, _, r in results] == [(0, None), (1, "truncated")]
    assert not decoder.sent


def test_store_rows_of_a_window_with_other_files_in_its_range(tmp_path):
    """A window's rows come from one range query; when other files lie in that range in
    large numbers, each path is looked up instead, and every stored path is found."""
    from tlapp.data.check_store import CheckStore

    store = CheckStore(tmp_path / "cache")
    stat = types.SimpleNamespace(st_size=1, st_mtime_ns=1)
    for i in range(400):  # the window's files interleaved with 10x as many others
        store.add_file(f"/d/{i:04d}/a.jpg", stat, f"{i:064x}", 10**18)
        for k in range(10):
            store.add_file(f"/d/{i:04d}/b{k}.jpg", stat, f"{i:064x}", 10**18)
    store.flush()
    window = [f"/d/{i:04d}/a.jpg" for i in range(0, 400, 3)] + ["/d/missing.jpg"]
    rows = store.rows_of(window)
    assert {path for path in window if path in rows} == set(window[:-1])
    assert rows[window[1]][2] == bytes.fromhex(f"{3:064x}")
    neighbours = [f"/d/0007/b{k}.jpg" for k in range(10)]
    assert set(store.rows_of(neighbours)) >= set(neighbours)
    store.close()
