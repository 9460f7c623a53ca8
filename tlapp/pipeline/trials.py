"""Many trainings that differ in training settings, on one scan and one feature cache.

A hyperparameter search (or a learning-rate grid) trains the same data again and again.
`TrialRunner` scans the folder once, builds each distinct backbone and finds its cache
entry once (a trial that changes the cut or the number of views gets its own), and per
trial builds a fresh head, trains exactly as `pipeline.run` would (same seeds, same
stages: the best trial's configuration rerun by `tlapp train` reaches the same validation
accuracy) and evaluates on the validation split only: the test split stays untouched until
the chosen configuration's final run. Nothing is exported.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

from tlapp import config as config_lib
from tlapp.augment.ops import cached_pca
from tlapp.backbones import registry
from tlapp.config import Config
from tlapp.errors import UserInputError
from tlapp.pipeline import rates, stages
from tlapp.pipeline.plan import Backbones, Splits, resolve_plan, scan_data
from tlapp.training.checkpoint import Checkpoint

log = logging.getLogger(__name__)

# Settings that change the frozen stem or what the cache holds: trials that differ in one
# of them use different backbone instances and cache entries.
STEM_KEYS = ("cut", "trainable_blocks", "aug_views", "cache", "cache_dtype")


@dataclasses.dataclass
class Outcome:
    """One trial: its resolved config, validation accuracy, history and seconds."""

    config: Config
    val_accuracy: float | None
    history: list[dict]
    seconds: float
    extracted: int  # images the stem ran on for this trial (0 once the cache holds them)


@dataclasses.dataclass
class _Stem:
    loaders: dict | None  # FeatureLoader per split (None: stage 1 trains on images)
    stats: dict


class TrialRunner:
    """Trains configs that share data, backbone, weights, image size and seed (see the
    module doc). Use as a context manager: it closes the cache readers."""

    def __init__(self, base: Config):
        self.base = base
        self.spec = registry.get_spec(base.backbone, base.preprocess)
        self.cache_dir = Path(base.cache_dir or config_lib.default_cache_dir()).expanduser()
        self.scanned = scan_data(base, self.cache_dir)
        self.splits = Splits.of(self.scanned)
        if not self.splits.count("train"):
            raise UserInputError(f"No training images in {self.scanned.root} after the split.")
        if not self.splits.count("val"):
            raise UserInputError(f"No validation images in {self.scanned.root}: trials are "
                                 f"compared on the validation split. Set val_fraction > 0 or "
                                 f"add a val/ folder.")
        self.pca = cached_pca(base.augment, self.splits.paths["train"],
                              self.splits.digests["train"],
                              base.image_size or self.spec.default_size, self.cache_dir)
        self._stems: dict[tuple, _Stem] = {}
        self._backbones = Backbones()  # one per stem: its initial weights before each trial
        self._closing = contextlib.ExitStack()

    def __enter__(self) -> "TrialRunner":
        return self

    def __exit__(self, *exc) -> None:
        self._closing.close()
        self._stems.clear()
        self._backbones.clear()

    def train(self, config: Config, folder: Path,
              callbacks: Callable[[str], list] = lambda stage: []) -> Outcome:
        """Trains one config (which must differ from the base in training settings only)
        in `folder` (its checkpoints, and the range-test plot with lr = "auto"; the
        checkpoints are deleted afterwards). `callbacks(stage)` gives extra Keras callbacks
        per stage (pruning, tracking); an exception they raise ends the trial."""
        start = time.perf_counter()
        key = tuple(getattr(config, k) for k in STEM_KEYS)
        stem = self._stems.get(key)
        kept = Backbones.key(config, self.spec) + key
        plan = resolve_plan(config, self.spec, self.scanned, self.cache_dir, folder,
                            base=self._backbones.get(kept))
        self._backbones.keep(kept, plan.base)
        models = stages.build_models(plan)
        extracted = 0
        if stem is None:
            loaders, stats = (None, {}) if plan.live else stages.cached_features(
                plan, models, self.scanned, self.splits, self.pca, self._closing)
            stem = self._stems[key] = _Stem(loaders, stats)
            extracted = stats.get("extracted", 0)
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint = Checkpoint(folder / "checkpoints", models.full)
        splits, features = self.splits, None
        try:
            if plan.live:
                stages.adapt_live(plan, models, splits)
                rates.resolve_auto(plan, "head", splits, models.full, stages.image_loader(
                    plan, splits, "train", self.pca), True, folder)
                stages.train_live(plan, models, splits, checkpoint, None, self.pca,
                                  callbacks(stages.stage_one_name(plan)))
            else:
                features = stages.adapt_cached(plan, models, splits, stem.loaders)
                rates.resolve_auto(plan, "head", splits, models.train, stem.loaders["train"],
                                   False, folder)
                stages.train_on_cache(plan, models, splits, stem.loaders, features, checkpoint,
                                      None, callbacks("head"))
            if config.fine_tune_epochs:
                stages.unfreeze(plan, models)
                rates.resolve_auto(plan, "fine_tune", splits, models.full, stages.image_loader(
                    plan, splits, "train", self.pca), True, folder)
                stages.fine_tune(plan, models, splits, checkpoint, None, self.pca,
                                 callbacks("fine_tune"))
                features = None
            results, _ = stages.evaluate_splits(plan, models, splits, features,
                                                self.scanned.classes, names=("val",))
        finally:
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
            if not any(folder.iterdir()):  # kept only when it holds a range-test plot
                folder.rmdir()
        return Outcome(plan.config, results["val"]["accuracy"], checkpoint.state["history"],
                       time.perf_counter() - start, extracted)
