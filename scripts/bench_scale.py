"""From 300 to ten million images: how each stage of tlapp grows, measured.

Every measurement runs in a fresh Python process (so its peak RSS is its own), on folders of
tiny generated JPEGs or on stand-in cache entries; with --baseline DIR the same measurement
also runs with the tlapp found in DIR (e.g. a checkout of the code before this change), side
by side, so the ratios are taken under the same machine load. Parts:

  scan     cold scan and rescan of folders of N files: files/s, peak RSS (per file)
  memory   peak RSS of one cold scan of N files (no baseline; e.g. N = 1,000,000)
  growth   extraction rows/s in the first and the last 10% of an entry of N rows, filled by
           a stand-in stem with the real output shape (pooled: 2048 float32 per row; spatial:
           small rows, 160 rows per shard, so the number of shards is what a 14x14x1024
           float16 entry would have)
  reads    rows/s of head training's shuffled reads from that pooled entry, batches taken
           in Python and in a graph (as Keras's train function takes them), and rows per
           CPU-second (all threads: what machine load distorts least); new and baseline
           interleaved --repeats times (medians); against the rate head training consumes
  head     head training (`fit.fit_stage`) on rows of that pooled entry: rows/s with 32
           steps per call of Keras's train function against one, interleaved (medians)
  trial    the second trial of an experiment on a folder of N files (cache reused): its
           costs besides training (scan, model, cache, evaluation, export)
  run300   `tlapp train` on 300 256-px JPEGs (resnet50, 224 px, weights none, 10 epochs,
           cold cache) against the Keras guide's recipe on the same images: wall times, and
           everything except extraction and training

    python scripts/bench_scale.py scan --files 2000 20000 200000 --baseline /work/main
    python scripts/bench_scale.py memory --files 1000000
    python scripts/bench_scale.py growth --rows 1000000 [--baseline ... --baseline-rows 200000]
    python scripts/bench_scale.py reads --rows 1000000 --baseline /work/main --repeats 3
    python scripts/bench_scale.py head --rows 100000 --read-epochs 2 --repeats 3
    python scripts/bench_scale.py trial --files 50000 --baseline /work/main [--share-cache --repeats 3]
    python scripts/bench_scale.py run300 --baseline /work/main --repeats 2

Generated data goes to --work (default: a temporary folder, deleted afterwards).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


# --- workers: run in a child process, print one JSON line -------------------------------

def worker_scan(folder: str, cache: str) -> dict:
    from tlapp.data import scan

    rss_before = _rss_kb()
    tick = time.perf_counter()
    scanned = scan.scan_folder(folder, cache_dir=cache)
    return {"seconds": time.perf_counter() - tick, "files": len(scanned.samples),
            "rss_before_kb": rss_before, "rss_peak_kb": _rss_kb()}


def worker_growth(images: str, cache: str, rows: int, kind: str) -> dict:
    """Extracts `rows` rows (synthetic content hashes, images read in a cycle) with a
    stand-in stem; returns the time at which each shard was written."""
    import hashlib

    import keras
    import numpy as np

    from tlapp.features import cache as cache_lib
    from tlapp.features.extract import extract_features

    shape = (2048,) if kind == "pooled" else (2, 2, 8)
    pixels = keras.Input((16, 16, 3))
    if kind == "pooled":
        x = keras.layers.Dense(2048)(keras.layers.GlobalAveragePooling2D()(pixels))
    else:
        x = keras.layers.Conv2D(8, 1)(keras.layers.AveragePooling2D(8)(pixels))
    stem = keras.Model(pixels, x)
    assert tuple(stem.output.shape[1:]) == shape
    dtype = "float32" if kind == "pooled" else "float16"
    key = cache_lib.cache_key(f"stand-in-{kind}", stem, "cut", kind == "pooled", 16, "none",
                              dtype=dtype)
    row_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    shard_bytes = 64 * 2**20 if kind == "pooled" else 160 * row_bytes
    files = sorted(Path(images).glob("*.jpg"))
    paths = {hashlib.sha256(f"row {i}".encode()).hexdigest(): files[i % len(files)]
             for i in range(rows)}
    feature_cache = cache_lib.FeatureCache(cache, key, shard_bytes)
    marks = []
    real = feature_cache.write_shard

    def write_shard(*args, **kwargs):
        real(*args, **kwargs)
        marks.append((time.perf_counter(), len(args[0])))

    feature_cache.write_shard = write_shard
    start = time.perf_counter()
    extract_features(feature_cache, stem, paths, 16, batch_size=160)
    return {"start": start, "marks": marks, "rss_peak_kb": _rss_kb(),
            "entry": str(feature_cache.dir)}


def worker_reads(cache: str, kind_key: str, rows: int, epochs: int) -> dict:
    """Rows/s of `epochs` epochs of shuffled streaming reads (what head training does),
    twice: batches taken one by one in Python (`rows_per_s`), and taken inside a graph as
    Keras's train function takes them (`graph_rows_per_s`: the next epochs, same seed)."""
    import hashlib

    import numpy as np
    import tensorflow as tf

    from tlapp.data import datasets
    from tlapp.features import cache as cache_lib
    from tlapp.features.loader import FeatureLoader

    key = json.loads(kind_key)
    tick = time.perf_counter()
    feature_cache = cache_lib.FeatureCache(cache, key)
    digests = [hashlib.sha256(f"row {i}".encode()).hexdigest() for i in range(rows)]
    loader = FeatureLoader(feature_cache, digests, np.zeros(rows, np.int32), 2)
    open_s = time.perf_counter() - tick
    batches = iter(datasets.shuffled_batches(rows, 32, 0, 0, epochs, loader))
    next(batches)
    _drop_page_cache(loader)
    tick, cpu = time.perf_counter(), time.process_time()  # CPU: all threads, load-proof
    count = sum(int(x.shape[0]) for x, _ in batches)
    python_s, python_cpu = time.perf_counter() - tick, time.process_time() - cpu
    graph = datasets.shuffled_batches(rows, 32, 0, epochs, 2 * epochs, loader)
    # tf.data's autotuning off for both codes (the new one turns it off itself): with it,
    # either code's reads were at times paced by a timer (the old at 48,600 rows/s exactly)
    options = tf.data.Options()
    options.autotune.enabled = False
    graph = graph.with_options(options)
    _drop_page_cache(loader)
    tick, cpu = time.perf_counter(), time.process_time()
    graph_count = int(graph.reduce(tf.constant(0, tf.int64),
                                   lambda n, batch: n + tf.shape(batch[0], tf.int64)[0]))
    graph_s, graph_cpu = time.perf_counter() - tick, time.process_time() - cpu
    # the reads alone, without tf.data: one epoch of shuffled rows through the loader's own
    # read function, in calls of the rows each code reads at once (the old loader: a batch)
    gather = getattr(loader, "gather", None) or loader._gather
    step = getattr(loader, "read_rows", 32)
    order = np.random.default_rng(1).permutation(rows)
    _drop_page_cache(loader)
    tick, cpu = time.perf_counter(), time.process_time()
    for start in range(0, rows, step):
        idx = order[start:start + step]
        gather(idx, np.zeros_like(idx))
    gather_s, gather_cpu = time.perf_counter() - tick, time.process_time() - cpu
    return {"rows_per_s": count / python_s, "rows_per_cpu_s": count / python_cpu,
            "graph_rows_per_s": graph_count / graph_s,
            "graph_rows_per_cpu_s": graph_count / graph_cpu,
            "gather_rows_per_s": rows / gather_s, "gather_rows_per_cpu_s": rows / gather_cpu,
            "open_s": open_s, "rss_peak_kb": _rss_kb()}


def _drop_page_cache(loader) -> None:
    """With --cold: empties the kernel's page cache (root only), so that the next reads come
    from the disk, as for an entry larger than the memory. The loader's open shards are
    released first: the kernel keeps pages that a process has mapped."""
    if os.environ.get("BENCH_COLD") == "1":
        reader = loader.reader
        with reader._lock:
            for opened in reader._open.values():
                if isinstance(opened, tuple):  # the old reader: (descriptor, offset, size)
                    os.close(opened[0])
            reader._open.clear()
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")


def worker_consume(steps: int) -> dict:
    """Rows/s that head training consumes: the pooled head's `fit` on batches already in
    memory, 32 steps per call of the train function as `fit.fit_stage` runs it."""
    import keras
    import numpy as np
    import tensorflow as tf

    inputs = keras.Input((2048,))
    x = keras.layers.Dropout(0.2)(keras.layers.Normalization()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"],
                  steps_per_execution=32)
    x = np.random.default_rng(0).normal(size=(32, 2048)).astype("float32")
    y = keras.utils.to_categorical(np.arange(32) % 10, 10)
    batches = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(batches, steps_per_epoch=64, verbose=0)  # traced and warm
    tick = time.perf_counter()
    model.fit(batches, steps_per_epoch=steps, verbose=0)
    return {"rows_per_s": steps * 32 / (time.perf_counter() - tick)}


def worker_head(cache: str, kind_key: str, rows: int, epochs: int, per_call: int) -> dict:
    """Rows/s of head training (`fit.fit_stage`: a pooled head, dropout and a 10-class
    softmax, batches of 32) on `rows` rows of the pooled entry, `per_call` steps per call
    of Keras's train function (fit.STEPS_PER_CALL; 1 is one step per call, as before)."""
    import hashlib

    import keras
    import numpy as np

    from tlapp.features import cache as cache_lib
    from tlapp.features.loader import FeatureLoader
    from tlapp.training import checkpoint, fit

    feature_cache = cache_lib.FeatureCache(cache, json.loads(kind_key))
    digests = [hashlib.sha256(f"row {i}".encode()).hexdigest() for i in range(rows)]
    loader = FeatureLoader(feature_cache, digests, np.arange(rows) % 10, 10)
    fit.STEPS_PER_CALL = per_call
    keras.utils.set_random_seed(0)
    inputs = keras.Input((2048,))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(
        keras.layers.Dropout(0.2)(inputs)))
    settings = fit.Settings(epochs=epochs, batch_size=32, lr=1e-3, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        tick = time.perf_counter()
        history = fit.fit_stage("head", model, settings, rows, loader, None,
                                checkpoint.Checkpoint(Path(folder), model))
        seconds = time.perf_counter() - tick
    return {"rows_per_s": rows * epochs / seconds, "loss": [r["loss"] for r in history],
            "steps_per_execution": int(model.steps_per_execution)}


WORKERS = {"scan": worker_scan, "growth": worker_growth, "reads": worker_reads,
           "consume": worker_consume, "head": worker_head}


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far: less sensitive
    to the machine's load than wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(kind: str, *args, code: Path = HERE, timeout: float = 7200) -> dict:
    """Runs a worker in a fresh process with tlapp from `code`; returns its JSON."""
    env = dict(os.environ, PYTHONPATH=str(code), TF_CPP_MIN_LOG_LEVEL="3",
                   PYTHONSAFEPATH="1")  # -m must not import the tlapp in the cwd
    result = subprocess.run([sys.executable, __file__, "--worker", kind, *map(str, args)],
                            capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"{kind} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- data ---------------------------------------------------------------------------------

def write_jpegs(folder: Path, count: int, classes: int = 10, size: int = 16,
                seed: int = 0) -> Path:
    """`count` distinct tiny JPEGs in `classes` folders (reused if already there)."""
    import numpy as np
    from PIL import Image

    done = folder / f".complete-{count}"
    if done.is_file():
        return folder
    rng = np.random.default_rng(seed)
    for label in range(classes):
        (folder / f"class_{label:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 255, (size, size, 3), np.uint8)
        Image.fromarray(pixels).save(folder / f"class_{i % classes:03d}" / f"{i:08d}.jpg",
                                     quality=85)
    done.touch()
    return folder


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


# --- parts ----------------------------------------------------------------------------------

def part_scan(args, work: Path) -> dict:
    out = {}
    for n in args.files:
        folder = write_jpegs(work / f"scan-{n}", n)
        runs = {name: {"cold": [], "rescan": []} for name, _ in _codes(args)}
        for r in range(args.repeats):  # the codes interleaved, so they share the load
            for name, code in _codes(args):
                cache = work / f"scan-cache-{name}-{n}-{r}"
                shutil.rmtree(cache, ignore_errors=True)
                runs[name]["cold"].append(child("scan", folder, cache, code=code))
                runs[name]["rescan"].append(child("scan", folder, cache, code=code))
                shutil.rmtree(cache, ignore_errors=True)
        for name, runs_of in runs.items():
            out[f"{name} {n}"] = summary = {
                "cold_files_per_s": statistics.median(n / x["seconds"] for x in runs_of["cold"]),
                "rescan_s": statistics.median(x["seconds"] for x in runs_of["rescan"]),
                "cold_rss_peak_mb": max(x["rss_peak_kb"] for x in runs_of["cold"]) / 1024,
                "cold_rss_before_mb": min(x["rss_before_kb"] for x in runs_of["cold"]) / 1024,
                "rescan_rss_peak_mb": max(x["rss_peak_kb"] for x in runs_of["rescan"]) / 1024}
            summary["cold_kb_per_file"] = (summary["cold_rss_peak_mb"]
                                           - summary["cold_rss_before_mb"]) * 1024 / n
            print(f"scan {name:8s} {n:>9,} files: cold {summary['cold_files_per_s']:7.0f} "
                  f"files/s, rescan {summary['rescan_s']:6.2f} s, peak RSS "
                  f"{summary['cold_rss_peak_mb']:7.0f} MB ({summary['cold_kb_per_file']:.2f} "
                  f"KB/file over start {summary['cold_rss_before_mb']:.0f} MB); {load()}",
                  flush=True)
        if not args.keep:
            shutil.rmtree(folder)
    return out


def part_memory(args, work: Path) -> dict:
    out = {}
    for n in args.files:
        tick = time.perf_counter()
        folder = write_jpegs(work / f"memory-{n}", n)
        print(f"memory: wrote {n:,} files in {time.perf_counter() - tick:.0f} s", flush=True)
        result = child("scan", folder, work / f"memory-cache-{n}")
        out[n] = result | {"kb_per_file": (result["rss_peak_kb"] - result["rss_before_kb"]) / n}
        print(f"memory: cold scan of {n:,} files: {result['seconds']:.0f} s "
              f"({n / result['seconds']:.0f} files/s), peak RSS "
              f"{result['rss_peak_kb'] / 1024:.0f} MB, {result['rss_before_kb'] / 1024:.0f} MB "
              f"before the scan: {out[n]['kb_per_file']:.3f} KB per file; {load()}", flush=True)
        if not args.keep:
            shutil.rmtree(folder)
            shutil.rmtree(work / f"memory-cache-{n}", ignore_errors=True)
    return out


def _rates(result: dict) -> tuple[float, float, int]:
    """Rows/s of the shards holding the first and the last 10% of the rows."""
    marks, start = result["marks"], result["start"]
    total = sum(rows for _, rows in marks)
    times, done = [start], 0
    counts = []
    for when, rows in marks:
        times.append(when)
        counts.append(rows)
    cumulative = [sum(counts[:i + 1]) for i in range(len(counts))]
    first = next(i for i, c in enumerate(cumulative) if c >= total / 10)
    last = next(i for i, c in enumerate(cumulative) if c >= total * 0.9)
    # the first shard includes tracing: measure from the end of the first shard
    early = (cumulative[first] - cumulative[0]) / (times[first + 1] - times[1])
    late = (cumulative[-1] - cumulative[last]) / (times[-1] - times[last + 1])
    return early, late, len(marks)


def part_growth(args, work: Path) -> dict:
    images = write_jpegs(work / "growth-images", 256, classes=1)
    out = {}
    for kind in args.kinds:
        for name, code in _codes(args):
            rows = args.rows if name == "new" else args.baseline_rows or args.rows
            cache = work / f"growth-{name}-{kind}"  # one folder per kind: kept apart
            result = child("growth", images / "class_000", cache, rows, kind, code=code)
            early, late, shards = _rates(result)
            out[f"{name} {kind}"] = {"rows": rows, "shards": shards, "first_10pct": early,
                                     "last_10pct": late, "last_over_first": late / early}
            print(f"growth {name:8s} {kind:7s} {rows:>9,} rows in {shards:,} shards: first 10% "
                  f"{early:8.0f} rows/s, last 10% {late:8.0f} rows/s, last/first "
                  f"{late / early:.2f}; {load()}", flush=True)
            if not (kind == "pooled" and name == "new" and args.keep_entry):
                shutil.rmtree(cache, ignore_errors=True)
    return out


def _pooled_entry(cache: Path) -> dict:
    """The pooled entry that `growth --keep-entry` left in `cache`."""
    sys.path.insert(0, str(HERE))
    from tlapp.features import entries

    found = [e for e in entries.list_entries(cache) if e["key"].get("backbone", "")
             .endswith("pooled")] if cache.is_dir() else []
    if len(found) != 1:
        raise SystemExit(f"no pooled entry in {cache}: run 'growth --kinds pooled "
                         f"--keep-entry --work {cache.parent}' first")
    return found[0]


def part_reads(args, work: Path) -> dict:
    """Reads from the pooled entry `growth` left in work/growth-new-pooled (kept with
    --keep-entry; --rows must not exceed its rows)."""
    sys.path.insert(0, str(HERE))
    from tlapp.features import entries

    cache = work / "growth-new-pooled"
    entry = _pooled_entry(cache)
    key = json.dumps(entry["key"])
    old = None
    if args.baseline:  # the old code reads a manifest: write one beside hard links
        old = work / "growth-old-layout"
        shutil.rmtree(old, ignore_errors=True)
        source = cache / entry["entry"]
        target = old / entry["entry"]
        target.mkdir(parents=True)
        for shard in source.glob("shard-*.npy"):
            os.link(shard, target / shard.name)
        manifest = entries.read_manifest(source) | {"created": 0, "last_used": 0}
        (target / "manifest.json").write_text(json.dumps(manifest))
        del manifest
    runs = {"new": [], "old": []}
    for _ in range(args.repeats):  # interleaved: both codes see the same load
        for name, folder, code in (("new", cache, HERE), ("old", old, args.baseline)):
            if folder is None:
                continue
            result = child("reads", folder, key, args.rows, args.read_epochs, code=Path(code))
            runs[name].append(result)
            print(f"reads {name}: taken in Python {result['rows_per_s']:,.0f} rows/s "
                  f"({result['rows_per_cpu_s']:,.0f} per CPU-s), in a graph "
                  f"{result['graph_rows_per_s']:,.0f} rows/s ({result['graph_rows_per_cpu_s']:,.0f}"
                  f" per CPU-s), reads alone {result['gather_rows_per_s']:,.0f} rows/s "
                  f"({result['gather_rows_per_cpu_s']:,.0f} per CPU-s); opening the entry "
                  f"{result['open_s']:.1f} s; {load()}",
                  flush=True)
    if old is not None:
        shutil.rmtree(old)
    measures = {"rows_per_s": "rows/s taken in Python",
                "rows_per_cpu_s": "rows per CPU-second taken in Python",
                "graph_rows_per_s": "rows/s taken in a graph",
                "graph_rows_per_cpu_s": "rows per CPU-second taken in a graph",
                "gather_rows_per_s": "rows/s of the reads alone (no tf.data)",
                "gather_rows_per_cpu_s": "rows per CPU-second of the reads alone"}
    out = {name: {m: statistics.median(r[m] for r in results) for m in [*measures, "open_s"]}
           | {"runs": results} for name, results in runs.items() if results}
    out["consume"] = child("consume", 3200)
    print(f"head training consumes {out['consume']['rows_per_s']:,.0f} rows/s", flush=True)
    if "old" in out:
        for measure, label in measures.items():
            print(f"{label}: new {out['new'][measure]:,.0f} / old {out['old'][measure]:,.0f} "
                  f"= {out['new'][measure] / out['old'][measure]:.1f}x (medians of "
                  f"{args.repeats})", flush=True)
    return out


def part_trial(args, work: Path) -> dict:
    """`tlapp -q experiment` of two runs (lr 0.001, 0.01) on a warm cache, `--repeats`
    times per code, interleaved. With --share-cache the codes share one cache folder (it is
    extracted once, by the first experiment; only for codes with the same cache format)."""
    folder = write_jpegs(work / f"trial-{args.files[0]}", args.files[0], size=32)
    out: dict = {}
    for r in range(args.repeats):
        for name, code in _codes(args):
            run = work / f"trial-{name}"
            cache = work / "trial-cache" if args.share_cache else run / "cache"
            shutil.rmtree(run, ignore_errors=True)
            experiment = run / "exp.toml"
            run.mkdir(parents=True)
            experiment.write_text(
                f'data = "{folder}"\nbackbone = "mobilenet_v2"\nweights = "none"\n'
                f'image_size = 32\nepochs = 1\nbatch_size = 64\ncache_dir = "{cache}"\n'
                f'out = "{run / "out"}"\n[sweep]\nlr = [0.001, 0.01]\n')
            env = dict(os.environ, PYTHONPATH=str(code), TF_CPP_MIN_LOG_LEVEL="3",
                       PYTHONSAFEPATH="1")  # -m must not import the tlapp in the cwd
            tick, cpu = time.perf_counter(), _children_cpu()
            subprocess.run([sys.executable, "-m", "tlapp", "-q", "experiment", str(experiment)],
                           env=env, check=True, capture_output=True, timeout=7200)
            wall, cpu = time.perf_counter() - tick, _children_cpu() - cpu
            first, second = (run / "out" / n / "metrics.json" for n in ("lr=0.001", "lr=0.01"))
            timings = json.loads(second.read_text())["timings"]
            fixed = timings["total_s"] - timings.get("train_s", 0)
            # The whole second trial, what "total_s" leaves out included: from the first
            # run's metrics.json to the second's (the first run's model card and rename, the
            # results tables after it, the second run with its report.html).
            span = second.stat().st_mtime - first.stat().st_mtime
            row = {"wall_s": wall, "cpu_s": cpu, "timings": timings, "besides_training_s": fixed,
                   "span_besides_training_s": span - timings.get("train_s", 0)}
            out.setdefault(name, []).append(row)
            print(f"trial {name:8s} #{r}: second trial {timings}; besides training {fixed:.2f} "
                  f"s (metrics.json), {row['span_besides_training_s']:.2f} s (between the two "
                  f"runs' metrics.json); experiment wall {wall:.1f} s, CPU {cpu:.1f} s; "
                  f"{load()}", flush=True)
            shutil.rmtree(run)
    for name, rows in out.items():
        print(f"trial {name}: medians: besides training "
              f"{statistics.median(x['besides_training_s'] for x in rows):.2f} s, between "
              f"metrics.json {statistics.median(x['span_besides_training_s'] for x in rows):.2f}"
              f" s, experiment wall {statistics.median(x['wall_s'] for x in rows):.1f} s, CPU "
              f"{statistics.median(x['cpu_s'] for x in rows):.1f} s",
              flush=True)
    if not args.keep:
        shutil.rmtree(work / "trial-cache", ignore_errors=True)
    return out


GUIDE = """
import sys, time
tick = time.perf_counter()
import keras, tensorflow as tf
data, out = sys.argv[1], sys.argv[2]
train = keras.utils.image_dataset_from_directory(data, label_mode="categorical",
    image_size=(224, 224), batch_size=32, shuffle=True, seed=0).cache().prefetch(tf.data.AUTOTUNE)
base = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(224, 224, 3))
base.trainable = False
inputs = keras.Input((224, 224, 3))
x = base(keras.applications.resnet.preprocess_input(inputs), training=False)
x = keras.layers.Dropout(0.2)(keras.layers.GlobalAveragePooling2D()(x))
model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
model.fit(train, epochs=10, verbose=0)
model.save(out + "/model.keras")
model.export(out + "/saved_model", verbose=False)
"""


def part_run300(args, work: Path) -> dict:
    sys.path.insert(0, str(HERE / "scripts"))
    from bench_pipeline import write_folder

    data = work / "run300"
    if not data.is_dir():
        write_folder(data, 300, 256, 3)
    (work / "guide.py").write_text(GUIDE)
    raw: dict = {}
    for r in range(args.repeats):
        for name, code in _codes(args):
            run, cache = work / f"run300-{name}-{r}", work / f"run300-cache-{name}-{r}"
            env = dict(os.environ, PYTHONPATH=str(code), TF_CPP_MIN_LOG_LEVEL="3",
                   PYTHONSAFEPATH="1")  # -m must not import the tlapp in the cwd
            tick, cpu = time.perf_counter(), _children_cpu()
            subprocess.run([sys.executable, "-m", "tlapp", "-q", "train", str(data),
                            "--backbone", "resnet50", "--weights", "none", "--epochs", "10",
                            "--cache-dir", str(cache), "--out", str(run)],
                           env=env, check=True, capture_output=True, timeout=3600)
            wall, cpu = time.perf_counter() - tick, _children_cpu() - cpu
            timings = json.loads((run / "metrics.json").read_text())["timings"]
            row = {"wall_s": wall, "cpu_s": cpu, **timings,
                   "besides_s": wall - timings["extract_s"] - timings["train_s"]}
            raw.setdefault(name, []).append(row)
            print(f"run300 {name:8s} #{r}: wall {wall:.1f} s (CPU {cpu:.1f} s), {timings}, "
                  f"besides extraction and training {row['besides_s']:.1f} s; {load()}",
                  flush=True)
            shutil.rmtree(run)
            shutil.rmtree(cache)
        if args.skip_guide:
            continue
        guide_out = work / f"guide-{r}"
        guide_out.mkdir()
        tick = time.perf_counter()
        subprocess.run([sys.executable, str(work / "guide.py"), str(data), str(guide_out)],
                       check=True, capture_output=True, timeout=7200,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        raw.setdefault("guide", []).append({"wall_s": time.perf_counter() - tick})
        print(f"run300 guide    #{r}: wall {raw['guide'][-1]['wall_s']:.1f} s; {load()}",
              flush=True)
        shutil.rmtree(guide_out)
    medians = {name: {k: statistics.median(row[k] for row in rows) for k in rows[0]}
               for name, rows in raw.items()}
    for name in medians:
        if name != "guide" and "guide" in medians:
            print(f"run300 {name}: guide wall / tlapp wall "
                  f"{medians['guide']['wall_s'] / medians[name]['wall_s']:.2f}; besides "
                  f"extraction and training {medians[name]['besides_s']:.1f} s")
    return {"raw": raw, "medians": medians}


def part_head(args, work: Path) -> dict:
    """Head training on the pooled entry `growth` left (as for reads): several steps per
    call of the train function against one, interleaved --repeats times (medians)."""
    cache = work / "growth-new-pooled"
    key = json.dumps(_pooled_entry(cache)["key"])
    runs = {32: [], 1: []}
    for _ in range(args.repeats):
        for per_call in runs:
            result = child("head", cache, key, args.rows, args.read_epochs, per_call)
            runs[per_call].append(result)
            print(f"head, {result['steps_per_execution']} steps per call: "
                  f"{result['rows_per_s']:,.0f} rows/s, loss {result['loss']}; {load()}",
                  flush=True)
    medians = {k: statistics.median(r["rows_per_s"] for r in v) for k, v in runs.items()}
    print(f"head training rows/s: 32 steps per call {medians[32]:,.0f} / one {medians[1]:,.0f}"
          f" = {medians[32] / medians[1]:.2f}x (medians of {args.repeats})", flush=True)
    return {"runs": {str(k): v for k, v in runs.items()}, "medians": medians}


def _codes(args) -> list[tuple[str, Path]]:
    return [("new", HERE)] + ([("baseline", Path(args.baseline))] if args.baseline else [])


PARTS = {"scan": part_scan, "memory": part_memory, "growth": part_growth,
         "reads": part_reads, "trial": part_trial, "run300": part_run300,
         "head": part_head}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        kind, *rest = argv[1:]
        types = {"growth": (str, str, int, str), "reads": (str, str, int, int),
                 "consume": (int,), "scan": (str, str),
                 "head": (str, str, int, int, int)}[kind]
        print(json.dumps(WORKERS[kind](*(t(v) for t, v in zip(types, rest)))))
        return {}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=PARTS)
    parser.add_argument("--files", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--baseline-rows", type=int, help="rows for the baseline (growth)")
    parser.add_argument("--kinds", nargs="+", default=["pooled", "spatial"])
    parser.add_argument("--read-epochs", type=int, default=1)
    parser.add_argument("--cold", action="store_true",
                        help="reads: empty the page cache before each measure (needs root)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--baseline", help="a checkout of tlapp to compare with")
    parser.add_argument("--work", help="folder for the generated data (kept)")
    parser.add_argument("--keep", action="store_true", help="keep generated folders")
    parser.add_argument("--skip-guide", action="store_true",
                        help="run300: tlapp only, not the Keras guide's recipe")
    parser.add_argument("--share-cache", action="store_true",
                        help="trial: one cache folder for both codes (same cache format)")
    parser.add_argument("--keep-entry", action="store_true",
                        help="growth: keep the pooled entry (for reads)")
    parser.add_argument("--json", help="append the results to this JSON-lines file")
    args = parser.parse_args(argv)
    if args.cold:
        os.environ["BENCH_COLD"] = "1"  # the workers drop the page cache before measuring
    print(f"{args.part}: {os.cpu_count()} CPUs, {load()}, python {sys.version.split()[0]}",
          flush=True)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        result = PARTS[args.part](args, Path(args.work))
    else:
        with tempfile.TemporaryDirectory(prefix="tlapp-bench-scale-") as work:
            result = PARTS[args.part](args, Path(work))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"part": args.part, "args": vars(args), "load_end": load(),
                                "result": result}) + "\n")
    return result


if __name__ == "__main__":
    main()
