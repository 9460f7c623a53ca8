"""One function wires the steps: scan -> stem -> feature cache -> train -> evaluate -> export.

The CLI and the Python API (`tlapp.train`) only build a Config and call `run`.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from tlapp import backbones, cache as cache_lib, config as config_lib, data as data_lib
from tlapp import evaluation, exporting, head, report, training
from tlapp.config import Config, UserInputError
from tlapp.decoding import decode_file_bytes, describe_error


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

    def predict(self, images: list[str], top_k: int = 5) -> list[dict]:
        """Predicts image files; see `predict`."""
        return predict([self], images, top_k)


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


def predict(runs: list[Run], images: list[str], top_k: int = 5,
            batch_size: int = 32) -> list[dict]:
    """Top-k predictions for image files, folders or globs, averaged over `runs`.

    Returns:
        One dict per file, in input order: {"path", "predictions": [{"label",
        "probability"}, ...] best first}, or {"path", "error"} for a file it could not read.
    """
    labels = runs[0].labels
    results, pixels = [], {run.path: [] for run in runs}
    for path in data_lib.expand_inputs(images):
        try:
            raw = Path(path).read_bytes()
            for run in runs:
                pixels[run.path].append(decode_file_bytes(raw, run.image_size,
                                                          run.config.max_pixels))
            results.append({"path": path})
        except OSError as e:
            results.append({"path": path, "error": f"cannot read: {e.strerror or e}"})
        except Exception as e:  # TF decode errors
            results.append({"path": path, "error": f"cannot decode: {describe_error(e)}"})
    readable = [r for r in results if "error" not in r]
    if readable:
        probabilities = np.mean([run.model.predict(np.stack(pixels[run.path]),
                                                   batch_size=batch_size, verbose=0)
                                 for run in runs], axis=0)
        for result, row in zip(readable, probabilities):
            best = np.argsort(-row)[:top_k]
            result["predictions"] = [{"label": labels[i], "probability": float(row[i])}
                                     for i in best]
    return results


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


def run(config: Config, verbose: bool = True) -> Run:
    """Runs the whole pipeline for one config and returns the finished run."""
    start = time.perf_counter()
    timings = {}
    spec = backbones.get_spec(config.backbone)
    image_size = config.image_size or spec.default_size
    cache_dir = Path(config.cache_dir or config_lib.default_cache_dir()).expanduser()
    out = Path(config.out or default_out(spec.name)).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserInputError(f"Output folder {out} already exists and is not empty. "
                             f"Choose another --out or delete it.")
    if not config.data:
        raise UserInputError("No data given: pass an image folder (or tfds:NAME) as DATA.")
    data_root = data_lib.resolve_data(config.data, cache_dir, verbose=verbose)

    scanned = data_lib.scan_folder(data_root, config.val_fraction, config.test_fraction,
                                   verbose=verbose, max_pixels=config.max_pixels,
                                   cache_dir=cache_dir)
    timings["scan_s"] = time.perf_counter() - start

    base = backbones.build_backbone(spec, config.weights, image_size, config.seed)
    cut = backbones.resolve_cut(spec, base, config.cut, config.trainable_blocks)
    resolved = config.replace(
        data=config.data if config.data.startswith("tfds:") else str(data_root.resolve()),
        image_size=image_size, cut=cut, trainable_blocks=None,
        cache_dir=str(cache_dir.resolve()), out=str(out.resolve()))
    models = head.build_models(spec, base, cut, len(scanned.classes), config.dropout, image_size)
    if verbose:
        print(f"model: {spec.name} ({config.weights} weights), frozen up to '{cut}'; "
              f"training {models.train.count_params() - _frozen_params(models.train):,} "
              f"parameters on cached features of shape {tuple(models.stem.output.shape[1:])}")

    tick = time.perf_counter()
    key = cache_lib.entry_key(backbone=spec.name, weights=cache_lib.weights_identity(models.stem),
                              cut=cut, pooled=models.pooled, image_size=image_size,
                              preprocess=spec.preprocess)
    feature_cache = cache_lib.FeatureCache(cache_dir, key)
    files = {s.sha256: scanned.root / s.path for s in scanned.samples}
    cache_stats = feature_cache.extract(models.stem, files, image_size, config.batch_size,
                                        verbose=verbose)
    timings["extract_s"] = time.perf_counter() - tick

    def split_arrays(name):
        samples = scanned.split(name)
        return (feature_cache.read([s.sha256 for s in samples]),
                np.array([s.label for s in samples], dtype=np.int32))

    train_set, val_set, test_set = (split_arrays(name) for name in data_lib.SPLITS)
    if len(train_set[1]) == 0:
        raise UserInputError(f"No training images in {data_root} after the split.")

    temp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    tick = time.perf_counter()
    head.adapt_head(models, train_set[0])
    class_weight = training.balanced_class_weights(train_set[1], len(scanned.classes)) \
        if config.class_weight == "auto" else None
    history = training.fit_on_features(models.train, train_set, val_set, config.epochs,
                                        config.batch_size, config.lr, config.seed,
                                        log_dir=temp / "logs", verbose=verbose,
                                        class_weight=class_weight)
    timings["train_s"] = time.perf_counter() - tick

    results = {}
    for name, (features, labels) in (("val", val_set), ("test", test_set)):
        probabilities = models.train.predict(features, verbose=0) if len(labels) else None
        results[name] = evaluation.classification_metrics(labels, probabilities, scanned.classes)
    metrics = {
        "val_accuracy": results["val"]["accuracy"],
        "test_accuracy": results["test"]["accuracy"],
        "counts": scanned.counts(),
        "class_weight": class_weight and [class_weight[i] for i in range(len(scanned.classes))],
        "cache": cache_stats | {"entry": feature_cache.dir.name},
        "val": results["val"],
        "test": results["test"],
        "final_epoch": history[-1] if history else {},
    }

    tick = time.perf_counter()
    (temp / "config.toml").write_text(config_lib.to_toml(resolved))
    (temp / "labels.txt").write_text("\n".join(scanned.classes) + "\n")
    (temp / "split.json").write_text(json.dumps(scanned.split_json(), indent=1) + "\n")
    training.write_history(temp / "history.csv", history)
    (temp / "plots").mkdir()
    report.plot_history(history, temp / "plots" / "training_curves.png")
    if results["test"]["count"]:
        report.plot_confusion(results["test"]["confusion_matrix"], scanned.classes,
                              temp / "plots" / "confusion_matrix.png")
    models.full.save(temp / "model.keras")
    exporting.export_saved_model(models.full, scanned.classes, temp / "saved_model")
    timings["save_export_s"] = time.perf_counter() - tick
    timings["total_s"] = time.perf_counter() - start
    metrics["timings"] = {k: round(v, 3) for k, v in timings.items()}
    (temp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    if out.exists():
        out.rmdir()  # checked empty above
    out.parent.mkdir(parents=True, exist_ok=True)
    temp.rename(out)
    if verbose:
        print(f"done: val accuracy {_percent(metrics['val_accuracy'])}, test accuracy "
              f"{_percent(metrics['test_accuracy'])}; run folder {out}")
    return Run(out, resolved, scanned.classes, metrics, models.full)


def _frozen_params(model: keras.Model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)


def _percent(value: float | None) -> str:
    return "n/a (no images)" if value is None else f"{100 * value:.1f}%"


def evaluate_run(run: Run | str | Path, data: str | Path | None = None,
                 batch_size: int = 32, verbose: bool = True) -> dict:
    """Evaluates the whole model (pixels in) on the run's test split, or on every image of
    `data` (a folder with the run's class folders). Stores the result in metrics.json
    under "evaluate" and returns it.
    """
    run = run if isinstance(run, Run) else load_run(run)
    if data is None:
        root = data_lib.resolve_data(run.config.data, Path(run.config.cache_dir), verbose)
        split = json.loads((run.path / "split.json").read_text())
        paths = [root / p for p in split["test"]]
        class_part = 1 if (root / "train").is_dir() else 0  # train/CLASS/... or CLASS/...
        labels = [run.labels.index(p.split("/")[class_part]) for p in split["test"]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UserInputError(f"{len(missing)} test images of this run are gone "
                                 f"(first: {missing[0]}); pass --data DIR to evaluate elsewhere.")
    else:
        scanned = data_lib.scan_folder(data, 0.0, 0.0, verbose=verbose)
        unknown = sorted(set(scanned.classes) - set(run.labels))
        if unknown:
            raise UserInputError(f"{data} has classes the run does not know: "
                                 f"{', '.join(unknown)}. Known: {', '.join(run.labels)}.")
        paths = [scanned.root / s.path for s in scanned.samples]
        labels = [run.labels.index(scanned.classes[s.label]) for s in scanned.samples]
    if not paths:
        raise UserInputError("No images to evaluate on.")
    dataset = data_lib.image_dataset(paths, run.image_size, batch_size)
    probabilities = run.model.predict(dataset, verbose=1 if verbose else 0)
    result = evaluation.classification_metrics(np.array(labels), probabilities, run.labels)
    result["data"] = str(data) if data else "test split"
    metrics_file = run.path / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    cache_lib.write_json(metrics_file, metrics | {"evaluate": result})
    return result
