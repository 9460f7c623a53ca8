"""The training stages of a run: stage 1 live or on cached features, fine-tuning, and the
evaluation of the finished model on val and test."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import keras
import numpy as np

from tlapp.config import Config
from tlapp.constants import SPLITS
from tlapp.data import datasets
from tlapp.data.scan import ScannedData
from tlapp.errors import UserInputError
from tlapp.features.cache import DamagedCacheError, FeatureCache, cache_key
from tlapp.features.extract import extract_features
from tlapp.features.loader import FeatureLoader
from tlapp.inference import calibration, multilabel
from tlapp.inference.evaluate import classification_metrics
from tlapp.pipeline.plan import Plan, Splits
from tlapp.training import distribute, fit, head, sharding
from tlapp.training.checkpoint import Checkpoint

log = logging.getLogger(__name__)


def settings(plan: Plan, splits: Splits) -> fit.Settings:
    """Stage 1's fit settings (lr may still be "auto" for the range test)."""
    config = plan.config
    return fit.Settings(
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=config.seed,
        optimizer=config.optimizer, lr_schedule=config.lr_schedule,
        warmup_epochs=config.warmup_epochs, weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing, early_stopping=config.early_stopping,
        jit=config.jit, class_weight=class_weights(config, splits, plan.classes),
        multi_label=config.multi_label)


def fine_tune_settings(plan: Plan, splits: Splits) -> fit.Settings:
    """Stage 2's: its epochs, and its rate (default a tenth of stage 1's)."""
    config = plan.config
    return dataclasses.replace(settings(plan, splits), epochs=config.fine_tune_epochs,
                               lr=config.fine_tune_lr or config.lr / 10)


def class_weights(config: Config, splits: Splits, classes: int) -> dict[int, float] | None:
    return fit.balanced_class_weights(splits.labels["train"], classes) \
        if config.class_weight == "auto" else None


def image_loader(plan: Plan, splits: Splits, name: str, pca=None):
    """Decodes the split's files (augmented while training, for the train split)."""
    augment = fit.augmentation(plan.config.augment, plan.config.seed, pca) \
        if name == "train" else None
    return datasets.image_loader(splits.paths[name], splits.labels[name], plan.image_size,
                                 plan.classes, augment)


def val_images(plan: Plan, splits: Splits):
    if not splits.count("val"):
        return None
    return datasets.ordered_batches(image_loader(plan, splits, "val"), splits.count("val"),
                                    plan.config.batch_size, parallel=True)


def build_models(plan: Plan) -> head.Models:
    """The stem, training and full models around the plan's backbone. The head's initial
    weights come from the seed, whether the backbone was built just now or reused."""
    keras.utils.set_random_seed(plan.config.seed)
    return head.build_models(plan.spec, plan.base, plan.cut, plan.classes, plan.config.dropout,
                             plan.image_size,
                             bn_trainable=plan.cut is None or plan.config.bn_trainable,
                             multi_label=plan.config.multi_label)


def log_model(plan: Plan, models: head.Models) -> None:
    trains = "every layer trains (from scratch)" if plan.cut is None else \
        f"frozen up to '{plan.cut}'"
    where = "on images" if plan.live else \
        f"on cached features of shape {tuple(models.stem.output.shape[1:])}"
    log.info("model: %s (%s weights), %s; stage 1 trains %s parameters %s", plan.spec.name,
             plan.config.weights, trains, f"{trainable_params(models.train):,}", where)


def adapt_live(plan: Plan, models: head.Models, splits: Splits) -> None:
    """Standardises the head from pooled training images (identity from scratch)."""
    head.adapt_head(models, None if plan.cut is None else (
        sharding.predict_batch(models.pooled_pixels, x) for x in
        datasets.image_dataset(splits.paths["train"], plan.image_size,
                               plan.config.batch_size)))


def train_live(plan: Plan, models: head.Models, splits: Splits, checkpoint: Checkpoint,
               log_dir: Path | None, pca, callbacks: tuple = ()) -> None:
    """Stage 1 on images: from scratch (every layer), or with --cache off (`adapt_live`
    first)."""
    fit.fit_stage(stage_one_name(plan), models.full, settings(plan, splits),
                  splits.count("train"), image_loader(plan, splits, "train", pca),
                  val_images(plan, splits), checkpoint=checkpoint, log_dir=log_dir,
                  parallel=True, callbacks=callbacks)


def stage_one_name(plan: Plan) -> str:
    return "scratch" if plan.cut is None else "head"


def feature_cache(plan: Plan, models: head.Models) -> FeatureCache:
    """The cache entry of the plan's stem (its key: everything that changes activations)."""
    config = plan.config
    key = cache_key(plan.spec.name, models.stem, plan.cut, models.pooled, plan.image_size,
                    plan.spec.preprocess, views=config.aug_views, dtype=config.cache_dtype,
                    augment=config.augment, augment_seed=config.seed)
    return FeatureCache(plan.cache_dir, key, config.cache_shard_mb * 2**20)


def cached_features(plan: Plan, models: head.Models, scanned: ScannedData, splits: Splits,
                    pca, closing: contextlib.ExitStack) -> tuple[dict, dict]:
    """Extracts what the cache lacks; returns a streaming loader per split (closed with
    `closing`) and the cache statistics."""
    config = plan.config
    stats = None
    for attempt in (1, 2):
        # Outside the strategy: one copy of each row. Workers open the entry and extract
        # after the chief, so that in a shared cache they find its rows instead of writing
        # the same ones again.
        with plan.layout.paused(), distribute.chief_first(plan.layout):
            cache = feature_cache(plan, models)
            found = extract_features(cache, distribute.extraction_model(models.stem,
                                                                        plan.layout),
                                     scanned, plan.image_size, config.batch_size, pca=pca)
        stats = found if stats is None else {  # the second time: the damaged rows only
            "extracted": stats["extracted"] + found["extracted"],
            "reused": stats["reused"] - found["extracted"],
            "repaired": stats["repaired"] + found["repaired"] + found["extracted"]}
        loaders = {name: FeatureLoader(cache, splits.digests[name], splits.labels[name],
                                       plan.classes) for name in SPLITS}
        try:  # every row this run reads, once, before training: a damaged one is redone
            for loader in loaders.values():
                loader.check_rows()
            break
        except DamagedCacheError:
            for loader in loaders.values():
                loader.close()
            if attempt == 2:
                raise
            log.warning("cache: extracting the rows of the damaged shard(s) again")
    for loader in loaders.values():
        closing.enter_context(loader)
    return loaders, stats | {"entry": cache.dir.name}


def adapt_cached(plan: Plan, models: head.Models, splits: Splits, loaders: dict) -> dict:
    """Standardises the head from the cached training features; returns the ordered
    feature batches of each split."""
    batch_size = plan.config.batch_size
    features = {name: datasets.ordered_batches(loaders[name], splits.count(name), batch_size)
                for name in SPLITS}
    with damage_reported(loaders):
        head.adapt_head(models, (x if models.pooled else
                                 sharding.predict_batch(models.pooled_features, x)
                                 for x, _ in features["train"]))
    return features


@contextlib.contextmanager
def damage_reported(loaders: dict):
    """A shard found damaged while tf.data reads it (non-finite rows in a shard whose mtime
    was restored after an edit: only reading sees it) surfaces as the loader's one-paragraph
    DamagedCacheError (the shard is already removed), not as TensorFlow's wrapped error."""
    try:
        yield
    except Exception as error:
        damage = next((loader.reader.damage for loader in loaders.values()
                       if loader.reader.damage is not None), None)
        if damage is None or error is damage:
            raise
        raise damage from None


def train_on_cache(plan: Plan, models: head.Models, splits: Splits, loaders: dict,
                   features: dict, checkpoint: Checkpoint, log_dir: Path | None,
                   callbacks: tuple = ()) -> None:
    """Stage 1 on cached features (`features` from `adapt_cached`)."""
    with damage_reported(loaders):
        fit.fit_stage("head", models.train, settings(plan, splits), splits.count("train"),
                      loaders["train"], features["val"] if splits.count("val") else None,
                      checkpoint=checkpoint, log_dir=log_dir, callbacks=callbacks)


def unfreeze(plan: Plan, models: head.Models) -> None:
    """Before stage 2: unfreezes everything above the fine-tuning cut."""
    head.set_trainable(plan.base, plan.fine_tune_cut, plan.config.bn_trainable)
    log.info("fine_tune: unfrozen above '%s', %s parameters train on images",
             plan.fine_tune_cut or "the input", f"{trainable_params(models.full):,}")


def fine_tune(plan: Plan, models: head.Models, splits: Splits, checkpoint: Checkpoint,
              log_dir: Path | None, pca, callbacks: tuple = ()) -> None:
    """Stage 2 (after `unfreeze`): trains the full model on images."""
    fit.fit_stage("fine_tune", models.full, fine_tune_settings(plan, splits),
                  splits.count("train"), image_loader(plan, splits, "train", pca),
                  val_images(plan, splits), checkpoint=checkpoint, log_dir=log_dir,
                  parallel=True, callbacks=callbacks)


def evaluate_splits(plan: Plan, models: head.Models, splits: Splits, features: dict | None,
                    classes: list[str], names: tuple = ("val", "test")) -> tuple[dict, dict]:
    """Metrics and probabilities on `names` (val and test): from cached features when the
    stem is unchanged, else from images. A multi-label run's thresholds are tuned on val
    first (results["thresholds"]); a single-label run is calibrated on val first."""
    results, probabilities = {}, {"val": None, "test": None}
    for name in names:
        if not splits.count(name):
            probabilities[name] = None
        elif features is not None:
            probabilities[name] = models.train.predict(features[name], verbose=0)
        else:
            probabilities[name] = models.full.predict(datasets.image_dataset(
                splits.paths[name], plan.image_size, plan.config.batch_size), verbose=0)
    if plan.config.multi_label:
        thresholds = multilabel.tune_thresholds(splits.labels["val"], probabilities["val"],
                                                len(classes))
        results = {name: multilabel.multilabel_metrics(
            splits.labels[name], probabilities[name], classes, thresholds)
            for name in names} | {"thresholds": thresholds}
        return results, probabilities
    report, probabilities = calibrate(plan, models, splits, probabilities)
    for name in names:
        results[name] = classification_metrics(splits.labels[name], probabilities[name],
                                               classes)
    results["calibration"] = report
    results["reject"] = reject_threshold(plan.config, splits, probabilities)
    return results, probabilities


def calibrate(plan: Plan, models: head.Models, splits: Splits, probabilities: dict
              ) -> tuple[dict, dict]:
    """Fits a temperature on val, bakes it into the model, and returns the calibration
    report and the calibrated probabilities (with calibrate off or no val images: the
    reason, and the probabilities as they are)."""
    if plan.config.calibrate == "off":
        return {"temperature": 1.0, "skipped": "calibrate = off"}, probabilities
    reason = calibration.why_not_fit(probabilities["val"], splits.labels["val"])
    if reason:
        log.info("calibration: skipped (%s); temperature 1", reason)
        return {"temperature": 1.0, "skipped": reason}, probabilities
    temperature = calibration.fit_temperature(probabilities["val"], splits.labels["val"])
    report = calibration.calibration_report(temperature, {
        name: (probabilities[name], splits.labels[name]) for name in ("val", "test")
        if probabilities[name] is not None})
    calibration.bake_temperature(models.full, temperature)
    log.info("calibration: temperature %.3f; validation NLL %.4f -> %.4f, ECE %.4f -> %.4f",
             temperature, report["val"]["nll_before"], report["val"]["nll_after"],
             report["val"]["ece_before"], report["val"]["ece_after"])
    report["curves"] = {name: (probabilities[name], splits.labels[name])
                        for name in ("val", "test") if probabilities[name] is not None}
    return report, {name: None if p is None else calibration.scale(p, temperature)
                    for name, p in probabilities.items()}


def reject_threshold(config: Config, splits: Splits, probabilities: dict) -> dict | None:
    """The run's "none of these" threshold (given, or chosen on val to keep config.keep),
    and its coverage and selective accuracy on val and test; None without one."""
    if config.reject_below is None:
        return None
    if config.reject_below == "auto":
        if probabilities["val"] is None:
            raise UserInputError("reject_below = 'auto' chooses its threshold on the "
                                 "validation split, which has no images: give a number, or "
                                 "raise --val-fraction.")
        threshold = calibration.auto_threshold(probabilities["val"], config.keep)
    else:
        threshold = config.reject_below
    result = {"reject_below": threshold, "chosen": config.reject_below == "auto" and "auto"
              or "given", "keep": config.keep}
    for name in ("val", "test"):
        if probabilities[name] is not None:
            result[name] = calibration.selective(probabilities[name], splits.labels[name],
                                                 threshold)
    log.info("reject: 'unknown' below %.3f: keeps %.1f%% of validation images", threshold,
             100 * result.get("val", {}).get("coverage", float("nan")))
    return result


def trainable_params(model: keras.Model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)
