"""The cost of tf.distribute on one device: `--strategy mirrored` with 1 replica against
`--strategy one` (no strategy), on what a user runs (issue 15).

(This is issue 15's benchmark; it is not named bench_scale.py because issue 14 writes a
script of that name.) Writes a synthetic JPEG folder, then in this one process runs
`tlapp.train` with resnet50 (weights=None) for each case and strategy, repeats interleaved
so that load changes hit both strategies alike, and reports medians of run-time ratios, in
wall time and in the CPU seconds the process spent inside `fit.fit_stage` (less disturbed
by other processes on a shared machine):

  stage1  stage 1 on cached features (E epochs: compile, tracing, steps, checkpoints;
          the cache is filled before timing), metrics["timings"]["train_s"];
  stage1x4  the same with 4E epochs: (stage1x4 - stage1) is the cost of 3E epochs without
          what each fit pays once (compile, tracing), so its ratio is the per-epoch overhead;
  live    a live epoch: --cache off, the frozen stem runs on every image every step
          (read, decode, stem, head), train_s of L epochs.

  extract  `tlapp extract` of the folder in one process against `--shard 0/2` and `--shard
          1/2` as two processes at once (each with a fresh cache folder; the pair shares
          one, as cluster jobs share a file system): wall time, the CPU seconds the
          processes used (os.wait4), images/s, and images per CPU-second. Each process
          also pays its start-up, scan (hashing every file: each shard hashes all of them to
          pick its own) and model build, so `--extract-images` must be large for the ratio
          to show the extraction itself. Not part of the default cases.

With `--replicas 2` the CPU is split into 2 logical devices first (TLAPP_LOGICAL_CPUS) and
mirrored runs 2 replicas on the same 2 cores: no speed-up is possible; this shows the cost
of the distribution machinery itself (sharded input pipelines, all-reduce, synchronized
BatchNormalization in the live case is not involved: the stem is frozen).

    python scripts/bench_distribute.py [--images 256] [--size 128] [--epochs 10]
        [--live-epochs 2] [--repeats 3] [--replicas 1] [--cases stage1,stage1x4,live]
        [--json FILE]
    python scripts/bench_distribute.py --cases extract [--images 512] [--size 256]
        [--image-size 96] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tlapp
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import write_folder  # noqa: E402


FIT_CPU: list[float] = []  # CPU seconds of this process inside fit_stage, per call


def count_fit_cpu() -> None:
    """Records the process CPU time (all threads) of every `fit.fit_stage` call: on a
    shared machine this, unlike wall time, does not grow when other processes take the
    cores (it does grow a little with cache and memory-bus contention)."""
    from tlapp.training import fit

    real = fit.fit_stage

    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return real(*args, **kwargs)
        finally:
            FIT_CPU.append(time.process_time() - start)

    fit.fit_stage = timed  # the pipeline calls fit.fit_stage through the module


def train_seconds(data: Path, work: Path, strategy: str, name: str, args,
                  **options) -> tuple[float, float]:
    """metrics["timings"]["train_s"] of one run, and the CPU seconds of its fit_stage calls."""
    import tlapp

    FIT_CPU.clear()
    run = tlapp.train(str(data), backbone="resnet50", weights="none", image_size=args.size,
                      batch_size=args.batch_size, strategy=strategy, val_fraction=0.1,
                      test_fraction=0.0, cache_dir=str(work / "cache"),
                      out=str(work / f"{name}-{strategy}-{time.monotonic_ns()}"), **options)
    return run.metrics["timings"]["train_s"], sum(FIT_CPU)


def run_extractions(data: Path, cache: Path, shards: int, args) -> tuple[float, float]:
    """`tlapp extract` in `shards` processes at once (one: no --shard); returns the wall
    time until the last one ends and the CPU seconds (user + system) all of them used."""
    command = [sys.executable, "-m", "tlapp", "extract", str(data), "--backbone", "resnet50",
               "--weights", "none", "--image-size", str(args.image_size), "--batch-size",
               str(args.batch_size), "--cache-dir", str(cache)]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.perf_counter()
    processes = [subprocess.Popen(command + ([f"--shard={i}/{shards}"] if shards > 1 else []),
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for i in range(shards)]
    cpu = 0.0
    for process in processes:
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            raise RuntimeError(f"tlapp extract failed: {process.stderr.read().decode()[-2000:]}")
        process.stderr.close()
        cpu += usage.ru_utime + usage.ru_stime
    return time.perf_counter() - start, cpu


def bench_extract(args) -> dict:
    """One extraction process against two shard processes, interleaved (see the docstring)."""
    raw = {case: {"wall": [], "cpu": []} for case in ("one", "two", "fixed")}
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as folder:
        work = Path(folder)
        data = write_folder(work / "data", args.images, args.size, classes=4)
        for repeat in range(args.repeats):
            for case in ("one", "two") if repeat % 2 == 0 else ("two", "one"):
                cache = work / f"cache-{case}-{repeat}"
                wall, cpu = run_extractions(data, cache, 1 if case == "one" else 2, args)
                raw[case]["wall"].append(wall)
                raw[case]["cpu"].append(cpu)
                print(f"repeat {repeat} {case}: {wall:6.1f} s wall, {cpu:6.1f} CPU s", flush=True)
                if case == "one":  # again: every row reused, what a process costs besides
                    wall, cpu = run_extractions(data, cache, 1, args)
                    raw["fixed"]["wall"].append(wall)
                    raw["fixed"]["cpu"].append(cpu)
                    print(f"repeat {repeat} fixed: {wall:6.1f} s wall, {cpu:6.1f} CPU s",
                          flush=True)
    load, cores = os.getloadavg()[0], os.cpu_count()
    print(f"\n{args.images} JPEGs of {args.size} px, resnet50 at {args.image_size} px, "
          f"batch {args.batch_size}, {cores} cores, medians of {args.repeats}, load average at "
          f"the end {load:.1f}")
    results = {}
    fixed_wall, fixed_cpu = (statistics.median(raw["fixed"][k]) for k in ("wall", "cpu"))
    print(f"  a process that extracts nothing (start-up, scan of a scanned folder, model "
          f"build): {fixed_wall:.1f} s wall, {fixed_cpu:.1f} CPU s")
    for case, processes in (("one", 1), ("two", 2)):
        wall, cpu = (statistics.median(raw[case][k]) for k in ("wall", "cpu"))
        work_cpu = cpu - processes * fixed_cpu  # the scan's hashing and the extraction
        results[case] = {"wall_s": wall, "cpu_s": cpu, "images_per_s": args.images / wall,
                         "images_per_s_per_core": args.images / wall / cores,
                         "images_per_cpu_s": args.images / cpu,
                         "images_per_cpu_s_without_fixed": args.images / work_cpu}
        print(f"  {case}: {wall:6.1f} s wall, {cpu:6.1f} CPU s, {args.images / wall:6.1f} "
              f"images/s ({args.images / wall / cores:.1f} per core), "
              f"{args.images / cpu:.1f} images per CPU-second, "
              f"{args.images / work_cpu:.1f} without the fixed costs")
    results["fixed"] = {"wall_s": fixed_wall, "cpu_s": fixed_cpu}
    speedups = [o / t for o, t in zip(raw["one"]["wall"], raw["two"]["wall"])]
    results["speedup"] = statistics.median(speedups)
    print(f"  two shards / one process, wall-time speed-up {results['speedup']:.2f}x "
          f"(per repeat {', '.join(f'{r:.2f}' for r in speedups)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "raw": raw,
                                               "results": results, "load": load}, indent=1))
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10, help="stage-1 epochs on the cache")
    parser.add_argument("--live-epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1, choices=(1, 2))
    parser.add_argument("--cases", default="stage1,stage1x4,live",
                        help="comma-separated subset of stage1, stage1x4, live; or extract alone")
    parser.add_argument("--image-size", type=int, default=96,
                        help="the backbone's input size in the extract case")
    parser.add_argument("--json", help="also write the raw timings to this file")
    args = parser.parse_args(argv)
    if args.cases == "extract":
        return bench_extract(args)
    if args.replicas > 1:
        os.environ["TLAPP_LOGICAL_CPUS"] = str(args.replicas)
    import logging

    logging.getLogger("tlapp").setLevel(logging.WARNING)
    from tlapp.training import distribute

    distribute.split_cpu()  # before anything starts TensorFlow
    count_fit_cpu()
    with tempfile.TemporaryDirectory(prefix="bench_distribute_") as folder:
        work = Path(folder)
        data = write_folder(work / "data", args.images, args.size, classes=4)
        train_seconds(data, work, "one", "fill-cache", args, epochs=1)  # extraction, untimed
        cases = {"stage1": dict(epochs=args.epochs), "stage1x4": dict(epochs=4 * args.epochs),
                 "live": dict(epochs=args.live_epochs, cache="off")}
        cases = {name: cases[name] for name in args.cases.split(",")}
        raw = {case: {"one": [], "mirrored": []} for case in cases}
        cpu = {case: {"one": [], "mirrored": []} for case in cases}
        for repeat in range(args.repeats):
            for case, options in cases.items():
                for strategy in ("one", "mirrored") if repeat % 2 == 0 else ("mirrored", "one"):
                    wall, seconds = train_seconds(data, work, strategy, case, args, **options)
                    raw[case][strategy].append(wall)
                    cpu[case][strategy].append(seconds)
                    print(f"repeat {repeat} {case:6s} {strategy:8s} {wall:7.2f} s "
                          f"({seconds:6.2f} CPU s in fit)", flush=True)
    load = os.getloadavg()[0]
    print(f"\n{args.images} images at {args.size} px, batch {args.batch_size}, "
          f"mirrored with {args.replicas} replica(s), medians of {args.repeats}, "
          f"load average at the end {load:.1f}")
    results = {}
    for case in cases:
        one, mirrored = (statistics.median(raw[case][s]) for s in ("one", "mirrored"))
        ratios = [m / o for o, m in zip(raw[case]["one"], raw[case]["mirrored"])]
        results[case] = {"one_s": one, "mirrored_s": mirrored, "ratio": mirrored / one,
                         "ratios_per_repeat": ratios}
        print(f"  {case:6s} one {one:7.2f} s  mirrored {mirrored:7.2f} s  "
              f"ratio {mirrored / one:.2f}x  (per repeat {', '.join(f'{r:.2f}' for r in ratios)})")
        one, mirrored = (statistics.median(cpu[case][s]) for s in ("one", "mirrored"))
        ratios = [m / o for o, m in zip(cpu[case]["one"], cpu[case]["mirrored"])]
        results[case] |= {"one_cpu_s": one, "mirrored_cpu_s": mirrored,
                          "cpu_ratio": mirrored / one, "cpu_ratios_per_repeat": ratios}
        print(f"  {case:6s} CPU in fit: one {one:7.2f} s  mirrored {mirrored:7.2f} s  "
              f"ratio {mirrored / one:.2f}x  (per repeat {', '.join(f'{r:.2f}' for r in ratios)})")
    if "stage1" in cases and "stage1x4" in cases:  # per repeat, then the median
        marginal = [(m4 - m) / (o4 - o) for o, m, o4, m4 in zip(
            raw["stage1"]["one"], raw["stage1"]["mirrored"], raw["stage1x4"]["one"],
            raw["stage1x4"]["mirrored"])]
        results["stage1_per_epoch_ratio"] = statistics.median(marginal)
        print(f"  stage1 per-epoch overhead (stage1x4 - stage1): ratio "
              f"{statistics.median(marginal):.2f}x  (per repeat "
              f"{', '.join(f'{r:.2f}' for r in marginal)})")
        marginal = [(m4 - m) / (o4 - o) for o, m, o4, m4 in zip(
            cpu["stage1"]["one"], cpu["stage1"]["mirrored"], cpu["stage1x4"]["one"],
            cpu["stage1x4"]["mirrored"])]
        results["stage1_per_epoch_cpu_ratio"] = statistics.median(marginal)
        print(f"  the same in CPU seconds: ratio {statistics.median(marginal):.2f}x  (per "
              f"repeat {', '.join(f'{r:.2f}' for r in marginal)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "raw": raw, "cpu": cpu,
                                               "results": results, "load": load}, indent=1))
    return results


if __name__ == "__main__":
    main()
