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
from tlapp.features.cache import FeatureCache, cache_key
from tlapp.features.extract import extract_features
from tlapp.features.loader import FeatureLoader
from tlapp.inference.evaluate import classification_metrics
from tlapp.pipeline.plan import Plan, Splits
from tlapp.training import distribute, fit, head, sharding
from tlapp.training.checkpoint import Checkpoint

log = logging.getLogger(__name__)


def settings(plan: Plan, splits: Splits) -> fit.Settings:
    config = plan.config
    return fit.Settings(
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=config.seed,
        optimizer=config.optimizer, lr_schedule=config.lr_schedule,
        label_smoothing=config.label_smoothing, early_stopping=config.early_stopping,
        jit=config.jit, class_weight=class_weights(config, splits, plan.classes))


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


def log_model(plan: Plan, models: head.Models) -> None:
    trains = "every layer trains (from scratch)" if plan.cut is None else \
        f"frozen up to '{plan.cut}'"
    where = "on images" if plan.live else \
        f"on cached features of shape {tuple(models.stem.output.shape[1:])}"
    log.info("model: %s (%s weights), %s; stage 1 trains %s parameters %s", plan.spec.name,
             plan.config.weights, trains, f"{trainable_params(models.train):,}", where)


def train_live(plan: Plan, models: head.Models, splits: Splits, checkpoint: Checkpoint,
               log_dir: Path, pca) -> None:
    """Stage 1 on images: from scratch (every layer), or with --cache off."""
    scratch = plan.cut is None
    head.adapt_head(models, None if scratch else (
        sharding.predict_batch(models.pooled_pixels, x) for x in
        datasets.image_dataset(splits.paths["train"], plan.image_size,
                               plan.config.batch_size)))
    fit.fit_stage("scratch" if scratch else "head", models.full, settings(plan, splits),
                  splits.count("train"), image_loader(plan, splits, "train", pca),
                  val_images(plan, splits), checkpoint=checkpoint, log_dir=log_dir,
                  parallel=True)


def cached_features(plan: Plan, models: head.Models, scanned: ScannedData, splits: Splits,
                    pca, closing: contextlib.ExitStack) -> tuple[dict, dict]:
    """Extracts what the cache lacks; returns a streaming loader per split (closed with
    `closing`) and the cache statistics."""
    config = plan.config
    key = cache_key(plan.spec.name, models.stem, plan.cut, models.pooled, plan.image_size,
                    plan.spec.preprocess, views=config.aug_views, dtype=config.cache_dtype,
                    augment=config.augment, augment_seed=config.seed)
    files = {s.sha256: scanned.root / s.path for s in scanned.samples}
    # Outside the strategy: one copy of each row. Workers extract after the chief, so that
    # in a shared cache they find its rows instead of writing the same ones again.
    with plan.layout.paused(), distribute.chief_first(plan.layout):
        cache = FeatureCache(plan.cache_dir, key, config.cache_shard_mb * 2**20)
        stats = extract_features(cache, distribute.extraction_model(models.stem, plan.layout),
                                 files, plan.image_size, config.batch_size,
                                 pca=pca) | {"entry": cache.dir.name}
    loaders = {name: closing.enter_context(FeatureLoader(cache, splits.digests[name],
                                                         splits.labels[name], plan.classes))
               for name in SPLITS}
    return loaders, stats


def train_on_cache(plan: Plan, models: head.Models, splits: Splits, loaders: dict,
                   checkpoint: Checkpoint, log_dir: Path) -> dict:
    """Stage 1 on cached features; returns the ordered feature batches of each split."""
    batch_size = plan.config.batch_size
    features = {name: datasets.ordered_batches(loaders[name], splits.count(name), batch_size)
                for name in SPLITS}
    head.adapt_head(models, (x if models.pooled else
                             sharding.predict_batch(models.pooled_features, x)
                             for x, _ in features["train"]))
    fit.fit_stage("head", models.train, settings(plan, splits), splits.count("train"),
                  loaders["train"], features["val"] if splits.count("val") else None,
                  checkpoint=checkpoint, log_dir=log_dir)
    return features


def fine_tune(plan: Plan, models: head.Models, splits: Splits, checkpoint: Checkpoint,
              log_dir: Path, pca) -> None:
    """Stage 2: unfreeze deeper and train the full model on images."""
    config = plan.config
    head.set_trainable(plan.base, plan.fine_tune_cut, config.bn_trainable)
    log.info("fine_tune: unfrozen above '%s', %s parameters train on images",
             plan.fine_tune_cut or "the input", f"{trainable_params(models.full):,}")
    stage_two = dataclasses.replace(settings(plan, splits), epochs=config.fine_tune_epochs,
                                    lr=config.fine_tune_lr or config.lr / 10)
    fit.fit_stage("fine_tune", models.full, stage_two, splits.count("train"),
                  image_loader(plan, splits, "train", pca), val_images(plan, splits),
                  checkpoint=checkpoint, log_dir=log_dir, parallel=True)


def evaluate_splits(plan: Plan, models: head.Models, splits: Splits, features: dict | None,
                    classes: list[str]) -> tuple[dict, dict]:
    """Metrics and probabilities on val and test: from cached features when the stem is
    unchanged, else from images."""
    results, probabilities = {}, {}
    for name in ("val", "test"):
        if not splits.count(name):
            probabilities[name] = None
        elif features is not None:
            probabilities[name] = models.train.predict(features[name], verbose=0)
        else:
            probabilities[name] = models.full.predict(datasets.image_dataset(
                splits.paths[name], plan.image_size, plan.config.batch_size), verbose=0)
        results[name] = classification_metrics(splits.labels[name], probabilities[name],
                                               classes)
    return results, probabilities


def trainable_params(model: keras.Model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)
