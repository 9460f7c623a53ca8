"""Processes for tests/test_distribute.py: tf.distribute needs a fresh process (a logical CPU
split and a multi-worker strategy must precede TensorFlow's device start-up).

    python tests/distribute_helper.py mirrored OUT     # with TLAPP_LOGICAL_CPUS=2
    python tests/distribute_helper.py worker OUT ARGS  # with TF_CONFIG: `tlapp train ARGS`
    python tests/distribute_helper.py worker-python OUT ARGS  # the same through tlapp.train

`mirrored` trains the same runs with --strategy one and mirrored (2 replicas) in one
process and writes what the test compares to OUT/results.json. `worker` runs the CLI and
writes the final weights and the training images this worker decoded to OUT.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def weights_of(model) -> list[np.ndarray]:
    return [np.asarray(w) for w in model.get_weights()]


def losses(run) -> list[float]:
    import csv

    with open(run.path / "history.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def key_paths(value, prefix: str = "") -> set[str]:
    """Every key path of a nested dict ("val.count"; lists of rows as "history[]")."""
    if isinstance(value, dict):
        return set().union(*(key_paths(v, f"{prefix}.{k}" if prefix else str(k))
                             for k, v in value.items()), {prefix} if prefix else set())
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return key_paths(value[0], prefix + "[]")
    return {prefix}


def tiny_batchnorm_backbone(path: Path) -> str:
    """Two conv + BatchNormalization blocks: BatchNormalization trains from scratch."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 3))
    x = inputs
    for i, filters in enumerate((8, 16)):
        x = keras.layers.Conv2D(filters, 3, strides=2, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.Activation("relu", name=f"relu{i}")(x)
    keras.Model(inputs, x, name="tiny_bn").save(path)
    return str(path)


def compare_mirrored(out: Path) -> None:
    """Single device vs 2 replicas on the same global batches: stage 1 on cached features,
    then a live fine-tune in which BatchNormalization trains; extraction under the strategy;
    the --jit refusal."""
    import tlapp
    from tests.conftest import make_folder
    from tlapp import cli
    from tlapp.features import cache as cache_lib
    from tlapp.training import distribute

    distribute.split_cpu()  # TLAPP_LOGICAL_CPUS=2, before the backbone below starts TensorFlow
    # 18 train images: 3 global batches of 6; 3 val images: an uneven batch for 2 replicas
    data = make_folder(out / "data", per_class=9)
    backbone = tiny_batchnorm_backbone(out / "tiny_bn.keras")
    runs, entries, results = {}, {}, {}
    for strategy in ("one", "mirrored"):
        runs[strategy] = tlapp.train(
            str(data), backbone=backbone, weights="saved", image_size=32, batch_size=6,
            epochs=2, fine_tune_epochs=1, fine_tune_cut="relu0", bn_trainable=True,
            dropout=0.0, seed=1, strategy=strategy, cache_dir=str(out / f"cache_{strategy}"),
            out=str(out / strategy))
        np.savez(out / f"weights_{strategy}.npz", *weights_of(runs[strategy].model))
        cache = out / f"cache_{strategy}"
        [entry] = cache_lib.list_entries(cache)
        manifest = cache_lib.read_manifest(cache / entry["entry"])
        rows = [row for shard in manifest["shards"] for row in shard["rows"]]
        arrays = np.concatenate([np.load(cache / entry["entry"] / shard["file"],
                                         allow_pickle=False) for shard in manifest["shards"]])
        entries[strategy] = dict(zip(rows, arrays))
        results.setdefault("cache_rows", []).append([len(rows), len(set(rows))])
    one, mirrored = runs["one"], runs["mirrored"]
    results |= {
        "losses": [losses(one), losses(mirrored)],
        "train_images": one.metrics["counts"]["train"],
        "distribution": [one.metrics["distribution"], mirrored.metrics["distribution"]],
        "config_strategy": [r.config.strategy for r in (one, mirrored)],
        "metrics_keys": [sorted(key_paths(r.metrics)) for r in (one, mirrored)],
        "accuracy": [[r.metrics["val_accuracy"], r.metrics["test_accuracy"]]
                     for r in (one, mirrored)],
        "extracted": [r.metrics["cache"]["extracted"] for r in (one, mirrored)],
        "cache_equal": entries["one"].keys() == entries["mirrored"].keys() and all(
            np.array_equal(entries["one"][k], entries["mirrored"][k]) for k in entries["one"]),
        "saved_synchronized": '"synchronized": true' in
        (out / "mirrored" / "model.keras").read_bytes().decode("latin-1"),
    }
    results["jit_exit_code"] = cli.main([
        "train", str(data), "--backbone", backbone, "--weights", "saved", "--image-size", "32",
        "--strategy", "mirrored", "--jit", "--out", str(out / "jit")])
    (out / "results.json").write_text(json.dumps(results, indent=1))


def run_worker(out: Path, args: list[str], api: str = "cli") -> int:
    """`tlapp train ARGS` (api="cli") or tlapp.train with the config those flags make
    (api="python") as one worker of a cluster; records what the test checks."""
    import tensorflow as tf

    from tlapp import cli, pipeline
    from tlapp.data import datasets

    decoded = []  # training images this worker decoded (live stages)
    real_loader = datasets.image_loader

    def counting_loader(paths, labels, *rest, **options):
        load = real_loader(paths, labels, *rest, **options)

        def counted(i, epoch=None):
            if epoch is not None:  # a training read
                i = tf.ensure_shape(tf.py_function(
                    lambda v: decoded.append(int(v)) or v, [i], tf.int64), [])
            return load(i, epoch)

        return counted

    datasets.image_loader = counting_loader
    real_run, finished = pipeline.run, []
    pipeline.run = lambda *a, **k: finished.append(real_run(*a, **k)) or finished[-1]
    if api == "python":  # tlapp.train(config=...) in a fresh process, no CLI start-up
        import logging

        import tlapp
        from tlapp.cli.train import train_config

        logging.getLogger("tlapp").addHandler(logging.StreamHandler())  # what the test reads
        logging.getLogger("tlapp").setLevel(logging.INFO)
        config = train_config(cli.build_parser().parse_args(["train"] + args))
        try:
            tlapp.train(config=config)
            code = 0
        except tlapp.UserInputError as e:
            logging.getLogger("tlapp").error("error: %s", e)
            code = 2
    else:
        code = cli.main(["train"] + args)
    worker = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    if finished:
        np.savez(out / f"weights_{worker}.npz", *weights_of(finished[0].model))
    (out / f"decoded_{worker}.json").write_text(json.dumps(decoded))
    return code


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    if mode == "mirrored":
        compare_mirrored(folder)
    else:
        sys.exit(run_worker(folder, sys.argv[3:], "python" if mode == "worker-python" else "cli"))
