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
from tlapp import evaluation, exporting, head, inference, report, training
from tlapp.config import Config, UserInputError


@dataclasses.dataclass
class Run:
    """A finished run folder: its config, labels and metrics, and its model on demand."""

    path: Path
    config: Config
    labels: list[str]
    metrics: dict
    _model: keras.Model | None = None

    @property
    def model(self) -> keras.Model:
        """The whole model: RGB pixels (0-255) at config.image_size in, probabilities out."""
        if self._model is None:
            self._model = keras.saving.load_model(self.path / "model.keras", safe_mode=True)
        return self._model

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    def predict(self, images: list[str], top_k: int = 5, tta: str = "none") -> list[dict]:
        """Predicts image files; see `predict`."""
        return predict([self], images, top_k, tta=tta)


def load_run(path: str | Path) -> Run:
    """Opens a run folder written by `tlapp train`.

    Raises:
        UserInputError: `path` is not a finished run folder.
    """
    path = Path(path).expanduser()
    missing = [name for name in ("config.toml", "labels.txt", "model.keras")
               if not (path / name).is_file()]
    if missing:
        raise UserInputError(f"{path} is not a tlapp run folder (missing {', '.join(missing)}). "
                             f"Give the folder that 'tlapp train --out' wrote.")
    config = config_lib.from_dict(config_lib.load_toml(path / "config.toml"), str(path))
    labels = (path / "labels.txt").read_text().splitlines()
    metrics_file = path / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return Run(path, config, labels, metrics)


def _as_runs(runs) -> list[Run]:
    """A Run, a run folder, or a list of them -> a list of Runs."""
    runs = runs if isinstance(runs, (list, tuple)) else [runs]
    if not runs:
        raise UserInputError("No run given: pass a run folder (RUN, or --model RUN per ensemble "
                             "member).")
    return [r if isinstance(r, Run) else load_run(r) for r in runs]


def ensemble_members(runs) -> list[inference.Member]:
    """The runs as ensemble members, after checking they share labels.

    Raises:
        UserInputError: the runs' labels differ (the message names the runs and classes).
    """
    runs = _as_runs(runs)
    inference.check_same_labels([(str(r.path), r.labels) for r in runs])
    return [inference.Member(r.model, r.image_size, str(r.path)) for r in runs]


def iter_predictions(runs, images: list[str], top_k: int = 5, batch_size: int = 32,
                     tta: str = "none"):
    """Like `predict`, but yields each file's result as soon as its chunk is done."""
    runs = _as_runs(runs)
    members = ensemble_members(runs)
    labels = runs[0].labels
    files = data_lib.expand_inputs(images)
    for path, row, error in inference.predict_files(members, files, tta, batch_size):
        if error:
            yield {"path": path, "error": error}
        else:
            best = np.argsort(-row, kind="stable")[:top_k]
            yield {"path": path, "predictions": [{"label": labels[i],
                                                   "probability": float(row[i])} for i in best]}


def predict(runs, images: list[str], top_k: int = 5, batch_size: int = 32,
            tta: str = "none") -> list[dict]:
    """Top-k predictions for image files, folders or globs, averaged over `runs`.

    Args:
        runs: a Run or run folder, or several (an ensemble: probabilities are averaged;
            each run decodes at its own image size; labels must match).
        tta: "none", "flip" or "10crop" (see tlapp.inference).

    Returns:
        One dict per file, in input order: {"path", "predictions": [{"label",
        "probability"}, ...] best first}, or {"path", "error"} for a file it could not read.
    """
    return list(iter_predictions(runs, images, top_k, batch_size, tta))


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


def evaluate_run(run, data: str | Path | None = None, batch_size: int = 32,
                 verbose: bool = True, tta: str = "none", out: str | Path | None = None) -> dict:
    """Evaluates the whole model (pixels in) on the run's test split, or on every image of
    `data` (a folder with the run's class folders).

    Args:
        run: a Run or run folder, or several (an ensemble: probabilities are averaged).
        tta: "none", "flip" or "10crop" (see tlapp.inference).
        out: folder for the results (default: the run folder; for an ensemble
            models/ensemble-TIME). metrics.json there gets them under "evaluate";
            confusion_matrix.csv, misclassified.csv and plots/confusion_matrix.png are
            rewritten.

    Returns:
        The metrics (see evaluation.classification_metrics) plus data, tta, models, out.
    """
    runs = _as_runs(run)
    members = ensemble_members(runs)
    first = runs[0]
    if data is None:
        _check_same_test_split(runs)
        root = data_lib.resolve_data(first.config.data, Path(first.config.cache_dir), verbose)
        split = json.loads((first.path / "split.json").read_text())
        files = split["test"]
        paths = [root / p for p in files]
        class_part = 1 if (root / "train").is_dir() else 0  # train/CLASS/... or CLASS/...
        labels = [first.labels.index(p.split("/")[class_part]) for p in files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UserInputError(f"{len(missing)} test images of this run are gone "
                                 f"(first: {missing[0]}); pass --data DIR to evaluate elsewhere.")
    else:
        scanned = data_lib.scan_folder(data, 0.0, 0.0, verbose=verbose)
        unknown = sorted(set(scanned.classes) - set(first.labels))
        if unknown:
            raise UserInputError(f"{data} has classes the run does not know: "
                                 f"{', '.join(unknown)}. Known: {', '.join(first.labels)}.")
        files = [s.path for s in scanned.samples]
        paths = [scanned.root / p for p in files]
        labels = [first.labels.index(scanned.classes[s.label]) for s in scanned.samples]
    if not paths:
        raise UserInputError("No images to evaluate on.")
    rows, errors = [], []
    for path, row, error in inference.predict_files(members, [str(p) for p in paths], tta,
                                                    batch_size, verbose=verbose):
        rows.append(row)
        errors += [f"{path}: {error}"] if error else []
    if errors:
        raise UserInputError(f"{len(errors)} images could not be read (first: {errors[0]}). "
                             f"Fix or remove them, or pass --data DIR.")
    probabilities = np.stack(rows)
    result = evaluation.classification_metrics(np.array(labels), probabilities, first.labels)
    out = Path(out) if out else first.path if len(runs) == 1 else \
        Path("models") / f"ensemble-{time.strftime('%Y%m%d-%H%M%S')}"
    result |= {"data": str(data) if data else "test split", "tta": tta,
               "models": [str(r.path) for r in runs], "out": str(out)}
    evaluation.write_reports(out, result, files, np.array(labels), probabilities, first.labels)
    evaluation.update_metrics(out, "evaluate", result)
    return result


def _check_same_test_split(runs: list[Run]) -> None:
    first_split = json.loads((runs[0].path / "split.json").read_text())["test"]
    for other in runs[1:]:
        split = json.loads((other.path / "split.json").read_text())["test"]
        if other.config.data != runs[0].config.data or split != first_split:
            raise UserInputError(f"{runs[0].path} and {other.path} have different test splits, "
                                 f"so no test split is unseen by every member. Pass --data DIR "
                                 f"to evaluate the ensemble on one folder.")
