"""One function wires the steps: scan -> stem -> feature cache -> train -> evaluate -> export.

The CLI and the Python API (`tlapp.train`) only build a Config and call `run`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from tlapp import backbones, cache as cache_lib, config as config_lib, data as data_lib
from tlapp import evaluation, exporting, head, report, training
from tlapp.config import Config, UserInputError
from tlapp.runs import Run


def default_out(backbone: str) -> Path:
    return Path("models") / f"{backbone}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(data: str | None = None, config: Config | None = None, verbose: bool = True,
          **options) -> Run:
    """Trains a classifier on an image folder: the Python equivalent of `tlapp train`.

    Args:
        data: image folder (one subfolder per class, or train/val/test), or tfds:NAME.
        config: a base Config; `options` (any Config field) override it.

    Returns:
        The finished Run (its folder, config, labels and metrics).
    """
    values = config.to_dict() if config else {}
    values |= {"data": data} if data is not None else {}
    return run(config_lib.from_dict(values | options, "train"), verbose=verbose)


def partial_dir(out: Path) -> Path:
    """Where a run is written until it is complete (then renamed to `out`)."""
    return out.with_name(f".{out.name}.partial")


def resume_config(out: str | Path) -> Config:
    """The config of an interrupted run whose --out was `out`."""
    out = Path(out).expanduser()
    config_file = partial_dir(out) / "config.toml"
    if not config_file.is_file():
        finished = (out / "metrics.json").is_file()
        raise UserInputError(
            f"Nothing to resume at {out}: " + ("that run is finished." if finished else
                                               f"no interrupted run ({config_file} is missing)."))
    return config_lib.from_dict(config_lib.load_toml(config_file), str(config_file))


def run(config: Config, verbose: bool = True, resume: bool = False) -> Run:
    """Runs the whole pipeline for one config and returns the finished run.

    With resume=True, continues the interrupted run in `.OUT.partial/` from its last
    checkpoint (see `resume_config`).
    """
    start = time.perf_counter()
    spec = backbones.get_spec(config.backbone, config.preprocess)
    cache_dir = Path(config.cache_dir or config_lib.default_cache_dir()).expanduser()
    out = Path(config.out or default_out(spec.name)).expanduser()
    temp = partial_dir(out)
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise UserInputError(f"Output folder {out} already exists and is not empty. "
                                 f"Choose another --out or delete it.")
        shutil.rmtree(temp, ignore_errors=True)
    if not config.data:
        raise UserInputError("No data given: pass an image folder (or tfds:NAME) as DATA.")
    data_root = data_lib.resolve_data(config.data, cache_dir, verbose=verbose)
    scanned = data_lib.scan_folder(data_root, config.val_fraction, config.test_fraction,
                                   verbose=verbose, max_pixels=config.max_pixels,
                                   cache_dir=cache_dir)
    timings = {"scan_s": time.perf_counter() - start}
    policy = keras.mixed_precision.global_policy()
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        result = _train(config, spec, scanned, cache_dir, out, temp, timings, verbose)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    result.metrics["timings"]["total_s"] = round(time.perf_counter() - start, 3)
    cache_lib.write_json(temp / "metrics.json", result.metrics)
    if out.exists():
        out.rmdir()  # checked empty above
    out.parent.mkdir(parents=True, exist_ok=True)
    temp.rename(out)
    if verbose:
        print(f"done: val accuracy {_percent(result.metrics['val_accuracy'])}, test accuracy "
              f"{_percent(result.metrics['test_accuracy'])}; run folder {out}")
    return result


def _train(config: Config, spec: backbones.BackboneSpec, scanned: data_lib.ScannedData,
           cache_dir: Path, out: Path, temp: Path, timings: dict, verbose: bool) -> Run:
    image_size = config.image_size or spec.default_size
    base = backbones.build_backbone(spec, config.weights, image_size, config.seed)
    cut = backbones.resolve_cut(spec, base, config.cut, config.trainable_blocks)
    scratch = cut == backbones.INPUT_CUT  # every layer trains, on images
    cut = None if scratch else cut
    fine_tune_cut = backbones.resolve_fine_tune_cut(
        spec, base, cut, config.fine_tune_blocks, config.fine_tune_cut) \
        if config.fine_tune_epochs else None
    resolved = config.replace(
        data=config.data if config.data.startswith("tfds:") else str(scanned.root.resolve()),
        image_size=image_size, cut=cut, trainable_blocks="all" if scratch else None,
        cache_dir=str(cache_dir.resolve()), out=str(out.resolve()),
        **backbones.resolved_source(spec, config.weights))
    temp.mkdir(parents=True, exist_ok=True)
    (temp / "config.toml").write_text(config_lib.to_toml(resolved))
    (temp / "labels.txt").write_text("\n".join(scanned.classes) + "\n")
    (temp / "split.json").write_text(json.dumps(scanned.split_json(), indent=1) + "\n")

    classes = len(scanned.classes)
    models = head.build_models(spec, base, cut, classes, config.dropout, image_size,
                               bn_trainable=scratch or config.bn_trainable)
    if verbose:
        print(f"model: {spec.name} ({config.weights} weights), " +
              ("every layer trains (from scratch)" if scratch else f"frozen up to '{cut}'") +
              f"; stage 1 trains {_trainable_params(models.train):,} parameters " +
              ("on images" if scratch or config.cache == "off" else
               f"on cached features of shape {tuple(models.stem.output.shape[1:])}"))
    split = {name: scanned.split(name) for name in data_lib.SPLITS}
    labels = {name: np.array([s.label for s in split[name]], np.int32) for name in split}
    paths = {name: [scanned.root / s.path for s in split[name]] for name in split}
    if not len(labels["train"]):
        raise UserInputError(f"No training images in {scanned.root} after the split.")

    pca = _colour_pca(config, paths["train"], split["train"], image_size, cache_dir)

    def images(name):
        return training.image_source(paths[name], labels[name], image_size, classes,
                                     config.augment if name == "train" else None,
                                     config.seed, pca)

    def val_batches(source, parallel):
        return training.evaluation_batches(source("val"), len(labels["val"]),
                                           config.batch_size, parallel) \
            if len(labels["val"]) else None

    settings = training.Settings(
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=config.seed,
        optimizer=config.optimizer, lr_schedule=config.lr_schedule,
        label_smoothing=config.label_smoothing, early_stopping=config.early_stopping,
        jit=config.jit, class_weight=training.balanced_class_weights(labels["train"], classes)
        if config.class_weight == "auto" else None)
    checkpoint = training.Checkpoint(temp / "checkpoints", models.full)
    fit = dict(checkpoint=checkpoint, log_dir=temp / "logs", verbose=verbose)
    tick = time.perf_counter()
    if scratch or config.cache == "off":
        cache_stats = {"extracted": 0, "reused": 0, "mode": "off"}
        head.adapt_head(models, None if scratch else (
            models.pooled_pixels.predict_on_batch(x) for x in
            data_lib.image_dataset(paths["train"], image_size, config.batch_size)))
        training.fit_stage("scratch" if scratch else "head", models.full, settings,
                           len(labels["train"]), images("train"), val_batches(images, True),
                           parallel=True, **fit)
        features = None
    else:
        views = config.aug_views
        key = cache_lib.entry_key(
            backbone=spec.name, weights=cache_lib.weights_identity(models.stem), cut=cut,
            pooled=models.pooled, image_size=image_size, preprocess=spec.preprocess,
            precision=keras.mixed_precision.global_policy().name, views=views,
            dtype=config.cache_dtype if config.cache_dtype != "auto" else
            "float32" if models.pooled else "float16",
            **({"augment": config.augment, "augment_seed": config.seed} if views > 1 else {}))
        feature_cache = cache_lib.FeatureCache(cache_dir, key, config.cache_shard_mb * 2**20,
                                               verbose=verbose)
        cache_stats = feature_cache.extract(
            models.stem, {s.sha256: scanned.root / s.path for s in scanned.samples},
            image_size, config.batch_size, verbose=verbose, pca=pca) | {
            "entry": feature_cache.dir.name}
        timings["extract_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        loaders = {name: feature_cache.loader([s.sha256 for s in split[name]], labels[name],
                                              classes) for name in split}
        features = {name: training.evaluation_batches(loaders[name], len(labels[name]),
                                                      config.batch_size) for name in split}
        head.adapt_head(models, (x if models.pooled else models.pooled_features.predict_on_batch(x)
                                 for x, _ in features["train"]))
        training.fit_stage("head", models.train, settings, len(labels["train"]),
                           loaders["train"], val_batches(loaders.get, False), **fit)
    timings["train_s"] = time.perf_counter() - tick
    if config.fine_tune_epochs:
        tick = time.perf_counter()
        head.set_trainable(base, fine_tune_cut, config.bn_trainable)
        if verbose:
            print(f"fine_tune: unfrozen above '{fine_tune_cut or 'the input'}', "
                  f"{_trainable_params(models.full):,} parameters train on images")
        stage_two = dataclasses.replace(settings, epochs=config.fine_tune_epochs,
                                        lr=config.fine_tune_lr or config.lr / 10)
        training.fit_stage("fine_tune", models.full, stage_two, len(labels["train"]),
                           images("train"), val_batches(images, True), parallel=True, **fit)
        timings["fine_tune_s"] = time.perf_counter() - tick
        features = None  # the stem changed: evaluate on images

    results, probabilities = {}, {}
    for name in ("val", "test"):
        if not len(labels[name]):
            probabilities[name] = None
        elif features is not None:
            probabilities[name] = models.train.predict(features[name], verbose=0)
        else:
            probabilities[name] = models.full.predict(data_lib.image_dataset(
                paths[name], image_size, config.batch_size), verbose=0)
        results[name] = evaluation.classification_metrics(labels[name], probabilities[name],
                                                          scanned.classes)
    history = checkpoint.state["history"]
    metrics = {
        "val_accuracy": results["val"]["accuracy"],
        "test_accuracy": results["test"]["accuracy"],
        "counts": scanned.counts(),
        "class_weight": settings.class_weight and [settings.class_weight[i]
                                                   for i in range(classes)],
        "cache": cache_stats,
        "val": results["val"],
        "test": results["test"],
        "final_epoch": history[-1] if history else {},
    }
    tick = time.perf_counter()
    training.write_history(temp / "history.csv", history)
    (temp / "plots").mkdir(exist_ok=True)
    report.plot_history(history, temp / "plots" / "training_curves.png")
    if results["test"]["count"]:
        evaluation.write_reports(temp, results["test"], [s.path for s in scanned.split("test")],
                                 labels["test"], probabilities["test"], scanned.classes)
    models.full.save(temp / "model.keras")
    exporting.export_saved_model(models.full, scanned.classes, temp / "saved_model")
    shutil.rmtree(temp / "checkpoints", ignore_errors=True)  # the run is complete
    timings["save_export_s"] = time.perf_counter() - tick
    metrics["timings"] = {k: round(v, 3) for k, v in timings.items()}
    return Run(out, resolved, scanned.classes, metrics, models.full)


def _colour_pca(config: Config, paths: list[Path], samples: list, image_size: int,
                cache_dir: Path):
    """The training images' RGB PCA when the augmentation spec uses it, computed once per
    set of training images and size, and kept as JSON in the cache folder."""
    if not config.augment or "pca" not in config.augment:
        return None
    from tlapp import augment as augment_lib

    digest = hashlib.sha256(("".join(sorted(s.sha256 for s in samples)) +
                             str(image_size)).encode()).hexdigest()[:24]
    path = cache_dir / "pca" / f"{digest}.json"
    if path.is_file():
        return augment_lib.ColorPCA.from_dict(json.loads(path.read_text()))
    pca = augment_lib.compute_pca(data_lib.image_dataset(paths, image_size, 64))
    path.parent.mkdir(parents=True, exist_ok=True)
    cache_lib.write_json(path, pca.to_dict())
    return pca


def _trainable_params(model: keras.Model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _percent(value: float | None) -> str:
    return "n/a (no images)" if value is None else f"{100 * value:.1f}%"
