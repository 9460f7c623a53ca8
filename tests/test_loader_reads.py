"""Issue 14, item 3: the batched reads of head training give exactly the rows, in exactly
the order, that reading one row at a time gives: across shards, in the shuffled order of
every epoch, resumed mid-run, with augmented views; and damage is still reported."""
import numpy as np
import pytest
import tensorflow as tf

from tests.test_cache_index import digest, features_of, fill, key
from tlapp.data import datasets
from tlapp.features import cache as cache_lib
from tlapp.features.loader import FeatureLoader

ROWS = 30  # 8 shards of 4 rows (the last of 2): every read window spans several shards


def per_row(feature_cache, digests, views):
    """The rows of (digests[i], views[i]) read one at a time straight from the .npy files:
    the reference the batched reads must equal."""
    shards, rows = feature_cache.locate(digests)
    return np.stack([np.load(feature_cache.dir / feature_cache.shard_names[shards[i, v]],
                             mmap_mode="r")[rows[i, v]]
                     for i, v in enumerate(views)])


def epoch_order(n, seed, epoch):
    return tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64), seed=tf.constant([seed, epoch], tf.int64)).numpy()


def read_batches(loader, n, batch_size, seed, first_epoch, epochs):
    dataset = datasets.shuffled_batches(n, batch_size, seed, first_epoch, epochs, loader)
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def test_shuffled_batches_are_the_per_row_reads_in_the_shuffled_order(tmp_path):
    feature_cache = cache_lib.FeatureCache(tmp_path, key())
    digests = fill(feature_cache, 0, ROWS)
    labels = np.arange(ROWS, dtype=np.int32) % 3
    with FeatureLoader(feature_cache, digests, labels, 3) as loader:
        loader.read_rows = 12  # three batches of 4 per read: windows cross shards
        assert datasets.batches_per_call(loader, 4) == 3
        batches = read_batches(loader, ROWS, 4, 7, 0, 2)
        assert [len(x) for x, _ in batches] == [4] * 7 + [2] + [4] * 7 + [2]
        rows = np.concatenate([x for x, _ in batches])
        targets = np.concatenate([y for _, y in batches])
        order = np.concatenate([epoch_order(ROWS, 7, e) for e in (0, 1)])
        np.testing.assert_array_equal(rows, per_row(feature_cache, [digests[i] for i in order],
                                                    np.zeros(len(order), int)))
        np.testing.assert_array_equal(rows, features_of([digests[i] for i in order]))
        np.testing.assert_array_equal(targets.argmax(axis=1), labels[order])
        # resumed at epoch 1: the same batches as the second epoch of the whole run
        resumed = read_batches(loader, ROWS, 4, 7, 1, 2)
        np.testing.assert_array_equal(np.concatenate([x for x, _ in resumed]), rows[ROWS:])
        # one read per batch gives the same batches (only the number of reads differs)
        loader.read_rows = 0
        single = read_batches(loader, ROWS, 4, 7, 0, 2)
        np.testing.assert_array_equal(np.concatenate([x for x, _ in single]), rows)
        # ordered batches (validation): rows 0..n-1 as stored
        loader.read_rows = 12
        ordered = np.concatenate([x for x, _ in datasets.ordered_batches(loader, ROWS, 4)])
        np.testing.assert_array_equal(ordered, features_of(digests))


def test_batched_reads_of_augmented_views_are_the_per_row_reads(tmp_path):
    feature_cache = cache_lib.FeatureCache(tmp_path, key(views=3))
    digests = [digest(i) for i in range(ROWS)]
    for start in range(0, ROWS, 4):  # each shard holds rows of several views
        chunk = digests[start:start + 4]
        feature_cache.write_shard([cache_lib.row_key(d, v) for v in range(3) for d in chunk],
                                  np.concatenate([features_of(chunk, v) for v in range(3)]))
    with FeatureLoader(feature_cache, digests, np.zeros(ROWS, np.int32), 2) as loader:
        idx = np.concatenate([epoch_order(ROWS, 3, 0), [5, 5, 0]])  # duplicates too
        for epoch in range(4):
            rows, _ = loader(tf.constant(idx), epoch)
            views = (idx * 2654435761 % 4294967296 + epoch) % 3
            expected = per_row(feature_cache, [digests[i] for i in idx], views)
            np.testing.assert_array_equal(rows.numpy(), expected)
            np.testing.assert_array_equal(expected, np.stack(
                [features_of([digests[i]], v)[0] for i, v in zip(idx, views)]))
        assert len(set(((idx * 2654435761 % 4294967296) % 3).tolist())) == 3  # all views read


def test_a_shard_shorter_than_its_record_is_reported_as_damaged(tmp_path):
    """Regression: a shard file replaced by a shorter array after the entry was opened made
    the read fail with numpy's IndexError inside tf.data (or, for a run of consecutive
    rows, a shape error), not the cache's message; the shard is now removed and named."""
    feature_cache = cache_lib.FeatureCache(tmp_path, key())
    digests = fill(feature_cache, 0, 8)
    with FeatureLoader(feature_cache, digests, np.zeros(8, np.int32), 2) as loader:
        shard = feature_cache.dir / feature_cache.shard_names[loader.shards[3, 0]]
        np.save(shard, features_of(digests[:2]))  # was 4 rows; row 3 is asked for below
        with pytest.raises(cache_lib.DamagedCacheError, match=rf"{shard.name} \(holds 2 rows"):
            loader.gather(np.array([3, 0, 7]))
        assert loader.reader.damage is not None
    assert not shard.exists()


def test_rows_per_read_grow_with_the_shards_a_loader_uses():
    from tlapp.features.loader import read_rows

    pooled = 2048 * 4
    assert read_rows(pooled, 10) == 512  # 4 MB
    assert read_rows(pooled, 25) == 32 * 25
    assert read_rows(pooled, 123) == 32 * 123  # a 1M-row entry: 32 rows of each shard
    assert read_rows(pooled, 10_000) == 4096  # at most 32 MB
    assert read_rows(14 * 14 * 1024 * 2, 1000) == 32 * 2**20 // (14 * 14 * 1024 * 2)
    assert read_rows(10**9, 1) == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_non_finite_value_among_many_rows_names_its_shard_only(tmp_path, bad):
    """The read checks each shard's rows of a call by their max and min: NaN, inf and -inf
    in one value of one row are each caught, and only that row's shard is named."""
    from tlapp.features.loader import ShardReader

    good = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float16)
    np.save(tmp_path / "a.npy", good)
    damaged = good.copy()
    damaged[17, 4] = bad
    np.save(tmp_path / "b.npy", damaged)
    named = []
    reader = ShardReader(tmp_path, np.float16, ["a.npy", "b.npy"], (6,),
                         lambda names, reason: named.extend(names))
    shards, rows = np.array([0, 1, 0, 1]), np.array([3, 16, 9, 18])
    np.testing.assert_array_equal(reader.read(shards, rows), good[[3, 16, 9, 18]])
    with pytest.raises(cache_lib.DamagedCacheError, match="non-finite values"):
        reader.read(np.array([0, 1, 0]), np.array([17, 17, 2]))
    assert named == ["b.npy"]


def test_read_calls_are_one_element_each_and_their_rows_are_aligned(tmp_path):
    """The per-batch path makes one tf.data element per read call (not one per example,
    which cost more than the reads: about 0.6 us a row), and a call's rows start at a
    64-byte boundary, which tf.numpy_function takes without copying them (numpy's own
    arrays start at 16 bytes: one more copy of every row)."""
    feature_cache = cache_lib.FeatureCache(tmp_path, key())
    digests = fill(feature_cache, 0, ROWS)
    with FeatureLoader(feature_cache, digests, np.zeros(ROWS, np.int32), 3) as loader:
        loader.read_rows = 12
        for dataset in (datasets.shuffled_batches(ROWS, 4, 7, 0, 2, loader),
                        datasets.ordered_batches(loader, ROWS, 4)):
            graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())
            ops = {node.op for node in graph.node} | {
                node.op for function in graph.library.function for node in function.node_def}
            assert not ops & {"TensorSliceDataset", "BatchDataset", "BatchDatasetV2"}, ops
        many = np.arange(ROWS).repeat(40)  # 1,200 rows of 1 KB: a large allocation
        for rows in (loader.gather(many), loader.gather(many[:5])):
            assert rows.ctypes.data % 64 == 0 and rows.flags.c_contiguous


def test_read_calls_run_two_at_once_and_keep_their_order(tmp_path):
    """Two read calls run at once (a call's copies of random rows wait on memory and release
    the GIL: 1.2-1.35x the rows/s on 2 cores), and the batches still come in the order of
    one call at a time; tf.data's autotuning model is off on this pipeline (it paced the
    reads at one call per 10 ms in a third of runs) and stays on for images."""
    import threading
    import time

    feature_cache = cache_lib.FeatureCache(tmp_path, key())
    digests = fill(feature_cache, 0, ROWS)
    with FeatureLoader(feature_cache, digests, np.zeros(ROWS, np.int32), 3) as loader:
        loader.read_rows = 4
        expected = read_batches(loader, ROWS, 4, 7, 0, 2)
        lock, running, most = threading.Lock(), [0], [0]
        gather = loader.gather

        def slow_gather(idx, view):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.05)  # long enough for the next call to start
            with lock:
                running[0] -= 1
            return gather(idx, view)

        loader.gather = slow_gather
        batches = read_batches(loader, ROWS, 4, 7, 0, 2)
        assert most[0] == datasets.CALLS_IN_FLIGHT == 2
        for (x, y), (x0, y0) in zip(batches, expected, strict=True):
            np.testing.assert_array_equal(x, x0)
            np.testing.assert_array_equal(y, y0)
        for dataset in (datasets.shuffled_batches(ROWS, 4, 7, 0, 2, loader),
                        datasets.ordered_batches(loader, ROWS, 4)):
            assert dataset.options().autotune.enabled is False
    images = datasets.shuffled_batches(4, 2, 0, 0, 1, lambda i, e: (i, i), parallel=True)
    assert images.options().autotune.enabled is not False


def test_a_shard_found_damaged_by_two_reads_is_dropped_once(tmp_path):
    """Regression: with reads running at once, each read that met a damaged shard dropped
    it again (a second warning and count of its rows); it is now dropped once."""
    from tlapp.features.loader import ShardReader

    damaged = np.ones((8, 6), np.float16)
    damaged[5, 2] = np.nan
    np.save(tmp_path / "b.npy", damaged)
    dropped = []
    reader = ShardReader(tmp_path, np.float16, ["b.npy"], (6,),
                         lambda names, reason: dropped.append(names))
    for _ in range(2):
        with pytest.raises(cache_lib.DamagedCacheError, match=r"b\.npy \(non-finite"):
            reader.read(np.array([0, 0]), np.array([5, 1]))
    assert dropped == [["b.npy"]]


def test_an_entry_of_many_shards_opens_each_shard_once(tmp_path, monkeypatch):
    """Regression: a reader kept 128 shards open. A call reads rows of every shard, so with
    more shards (a 10M-row pooled entry has 1,230 at 64 MB) each call opened most of them
    again: 24,700 rows/s from 616 shards against 418,000 from 62. All the shards an entry
    has now stay open (the soft limit of open files raised to fit them), up to 8,192."""
    import resource

    from tlapp.features import loader as loader_lib
    from tlapp.features.loader import ShardReader, open_limit

    names = [f"s{i}.npy" for i in range(300)]
    for i, name in enumerate(names):
        np.save(tmp_path / name, np.full((4, 3), i, np.float32))
    opened = []
    real_load = np.load
    monkeypatch.setattr(loader_lib.np, "load", lambda path, **kw: (
        opened.append(path), real_load(path, **kw))[1])
    reader = ShardReader(tmp_path, np.float32, names, (3,))
    shards = np.random.default_rng(0).permutation(np.repeat(np.arange(300), 2))
    for _ in range(2):  # two calls, each over every shard
        rows = reader.read(shards, np.zeros(600, np.int64))
        np.testing.assert_array_equal(rows[:, 0], shards)
    assert len(opened) == 300
    reader.close()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:  # a low soft limit is raised toward the hard one
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        wanted = min(2000, loader_lib.MAX_OPEN_SHARDS)
        fits = hard == resource.RLIM_INFINITY or hard >= wanted + loader_lib.SPARE_DESCRIPTORS
        assert open_limit(2000) == (wanted if fits else max(
            loader_lib.OPEN_SHARDS, hard - loader_lib.SPARE_DESCRIPTORS))
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 256
        assert open_limit(10) == 128  # never fewer than before
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
