"""The cost of tf.distribute on one device: `--strategy mirrored` with 1 replica against
`--strategy one` (no strategy), on what a user runs (issue 15).

(This is issue 15's benchmark; it is not named bench_scale.py because issue 14 writes a
script of that name.) Writes a synthetic JPEG folder, then in this one process runs
`tlapp.train` with resnet50 (weights=None) for each case and strategy, repeats interleaved
so that load changes hit both strategies alike, and reports medians of run-time ratios:

  stage1  stage 1 on cached features (E epochs: compile, tracing, steps, checkpoints;
          the cache is filled before timing), metrics["timings"]["train_s"];
  stage1x4  the same with 4E epochs: (stage1x4 - stage1) is the cost of 3E epochs without
          what each fit pays once (compile, tracing), so its ratio is the per-epoch overhead;
  live    a live epoch: --cache off, the frozen stem runs on every image every step
          (read, decode, stem, head), train_s of L epochs.

With `--replicas 2` the CPU is split into 2 logical devices first (TLAPP_LOGICAL_CPUS) and
mirrored runs 2 replicas on the same 2 cores: no speed-up is possible; this shows the cost
of the distribution machinery itself (sharded input pipelines, all-reduce, synchronized
BatchNormalization in the live case is not involved: the stem is frozen).

    python scripts/bench_distribute.py [--images 256] [--size 128] [--epochs 10]
        [--live-epochs 2] [--repeats 3] [--replicas 1] [--cases stage1,stage1x4,live]
        [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tlapp
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import write_folder  # noqa: E402


def train_seconds(data: Path, work: Path, strategy: str, name: str, args, **options) -> float:
    import tlapp

    run = tlapp.train(str(data), backbone="resnet50", weights="none", image_size=args.size,
                      batch_size=args.batch_size, strategy=strategy, val_fraction=0.1,
                      test_fraction=0.0, cache_dir=str(work / "cache"),
                      out=str(work / f"{name}-{strategy}-{time.monotonic_ns()}"), **options)
    return run.metrics["timings"]["train_s"]


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
                        help="comma-separated subset of stage1, stage1x4, live")
    parser.add_argument("--json", help="also write the raw timings to this file")
    args = parser.parse_args(argv)
    if args.replicas > 1:
        os.environ["TLAPP_LOGICAL_CPUS"] = str(args.replicas)
    import logging

    logging.getLogger("tlapp").setLevel(logging.WARNING)
    from tlapp.training import distribute

    distribute.split_cpu()  # before anything starts TensorFlow
    with tempfile.TemporaryDirectory(prefix="bench_distribute_") as folder:
        work = Path(folder)
        data = write_folder(work / "data", args.images, args.size, classes=4)
        train_seconds(data, work, "one", "fill-cache", args, epochs=1)  # extraction, untimed
        cases = {"stage1": dict(epochs=args.epochs), "stage1x4": dict(epochs=4 * args.epochs),
                 "live": dict(epochs=args.live_epochs, cache="off")}
        cases = {name: cases[name] for name in args.cases.split(",")}
        raw = {case: {"one": [], "mirrored": []} for case in cases}
        for repeat in range(args.repeats):
            for case, options in cases.items():
                for strategy in ("one", "mirrored") if repeat % 2 == 0 else ("mirrored", "one"):
                    raw[case][strategy].append(train_seconds(data, work, strategy, case, args,
                                                             **options))
                    print(f"repeat {repeat} {case:6s} {strategy:8s} "
                          f"{raw[case][strategy][-1]:7.2f} s", flush=True)
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
    if "stage1" in cases and "stage1x4" in cases:  # per repeat, then the median
        marginal = [(m4 - m) / (o4 - o) for o, m, o4, m4 in zip(
            raw["stage1"]["one"], raw["stage1"]["mirrored"], raw["stage1x4"]["one"],
            raw["stage1x4"]["mirrored"])]
        results["stage1_per_epoch_ratio"] = statistics.median(marginal)
        print(f"  stage1 per-epoch overhead (stage1x4 - stage1): ratio "
              f"{statistics.median(marginal):.2f}x  (per repeat "
              f"{', '.join(f'{r:.2f}' for r in marginal)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "raw": raw,
                                               "results": results, "load": load}, indent=1))
    return results


if __name__ == "__main__":
    main()
