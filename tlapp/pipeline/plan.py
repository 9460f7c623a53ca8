"""What a run will do: its config resolved against the backbone and the data, and the splits."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path

import keras
import numpy as np

from tlapp.backbones import cuts, registry
from tlapp.backbones.spec import BackboneSpec
from tlapp.config import Config
from tlapp.constants import SPLITS
from tlapp.data.scan import ScannedData, resolve_data, scan_folder
from tlapp.errors import UserInputError
from tlapp.training.distribute import Layout, one_device

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Plan:
    """A config resolved against its backbone and data: what the run will do."""

    config: Config  # fully resolved: what config.toml records
    spec: BackboneSpec
    base: keras.Model
    cut: str | None  # where the frozen stem ends; None: every layer trains (from scratch)
    fine_tune_cut: str | None  # where the frozen part ends in stage 2
    cache_dir: Path
    labels: list[str]  # class names in class-index order
    layout: Layout  # the tf.distribute strategy it trains with

    @property
    def classes(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def live(self) -> bool:
        """Stage 1 trains on images (from scratch, or --cache off), not on cached features."""
        return self.cut is None or self.config.cache == "off"


def multi_hot(samples: list, classes: int) -> np.ndarray:
    targets = np.zeros((len(samples), classes), np.float32)
    for row, sample in enumerate(samples):
        targets[row, list(sample.labels)] = 1.0
    return targets


@dataclasses.dataclass
class Splits:
    """Files, labels and content hashes of the train, val and test splits. Labels are class
    indices [N], or multi-hot float32 [N, classes] for a multi-label scan."""

    paths: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    digests: dict[str, list[str]]

    @classmethod
    def of(cls, scanned: ScannedData) -> "Splits":
        samples = {name: scanned.split(name) for name in SPLITS}
        root = str(scanned.root)  # strings, not Path objects: a third of the memory
        return cls({name: [os.path.join(root, s.path) for s in samples[name]]
                    for name in SPLITS},
                   {name: multi_hot(samples[name], len(scanned.classes))
                    if scanned.multi_label else
                    np.array([s.label for s in samples[name]], np.int32) for name in SPLITS},
                   {name: [s.sha256 for s in samples[name]] for name in SPLITS})

    def count(self, name: str) -> int:
        return len(self.labels[name])


def scan_data(config: Config, cache_dir: Path, scans: dict | None = None) -> ScannedData:
    """The scanned data of `config`. `scans` (a dict kept by the caller, e.g. by an
    experiment for its runs) is a memo: a scan of the same folder with the same split
    fractions and pixel limit is reused, a new one is added."""
    if not config.data:
        raise UserInputError("No data given: pass an image folder (or tfds:NAME) as DATA.")
    root = resolve_data(config.data, cache_dir)
    memo = (str(root.resolve()), config.val_fraction, config.test_fraction, config.max_pixels,
            config.label_from, config.group_by, config.path_column, config.label_column,
            config.multi_label)
    if scans is not None and memo in scans:
        return scans[memo]
    scanned = scan_folder(root, config.val_fraction, config.test_fraction,
                          max_pixels=config.max_pixels, cache_dir=cache_dir,
                          label_from=config.label_from, group_by=config.group_by,
                          path_column=config.path_column, label_column=config.label_column,
                          multi_label=config.multi_label)
    if scans is not None:
        scans[memo] = scanned
    return scanned


class Backbones:
    """Backbones kept between the runs of one process that build the same one (the runs of
    an experiment, the trials of a search), so that each is built once: building one costs
    as much as a trial's other fixed costs together. A kept backbone is handed out with its
    initial weights restored (every run freezes and unfreezes its layers itself), so a run
    on it trains exactly as on a new one. `limit`: how many are kept (the oldest goes)."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self._kept: dict[tuple, tuple[keras.Model, list]] = {}

    @staticmethod
    def key(config: Config, spec: BackboneSpec) -> tuple:
        """What `registry.build_backbone` builds from (and the dtype policy it builds in)."""
        return (spec.name, config.backbone, config.preprocess, config.weights,
                config.image_size or spec.default_size, config.seed, config.mixed_precision)

    def get(self, key: tuple) -> keras.Model | None:
        """The kept backbone of `key` with its initial weights, or None."""
        kept = self._kept.get(key)
        if kept is None:
            return None
        base, weights = kept
        base.set_weights(weights)  # undo what the last run trained (fine-tuning, BN stats)
        return base

    def keep(self, key: tuple, base: keras.Model) -> None:
        """Keeps `base` as just built (call before training it)."""
        if key not in self._kept:
            self._kept[key] = (base, base.get_weights())
            while self.limit is not None and len(self._kept) > self.limit:
                del self._kept[next(iter(self._kept))]

    def clear(self) -> None:
        self._kept.clear()


@contextlib.contextmanager
def precision_policy(mixed: bool):
    """mixed_float16 compute for the block when `mixed`; the previous policy afterwards."""
    policy = keras.mixed_precision.global_policy()
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(policy)


def resolve_plan(config: Config, spec: BackboneSpec, scanned: ScannedData, cache_dir: Path,
                 out: Path, layout: Layout | None = None, base: keras.Model | None = None
                 ) -> Plan:
    """Builds the backbone (or takes `base`, one built for the same backbone, weights, size
    and seed) and turns every "resolve a default" of the config into a value. `layout`: the
    run's strategy (default one device)."""
    image_size = config.image_size or spec.default_size
    if base is None:
        base = registry.build_backbone(spec, config.weights, image_size, config.seed)
    cut = cuts.resolve_cut(spec, base, config.cut, config.trainable_blocks)
    scratch = cut == cuts.INPUT_CUT  # every layer trains, on images
    cut = None if scratch else cut
    if cut is not None and spec.collapses_at_random_init and config.weights == "none":
        log.warning(
            "%s's features at random initialisation are the same for every image (they "
            "collapse; 'tlapp backbones' marks such backbones), so a head trained on its frozen "
            "stem with weights=none learns nothing from the images. Use --weights imagenet "
            "or PATH, --trainable-blocks all to train every layer, or another backbone.",
            spec.name)
    fine_tune_cut = cuts.resolve_fine_tune_cut(
        spec, base, cut, config.fine_tune_blocks, config.fine_tune_cut) \
        if config.fine_tune_epochs else None
    live = cut is None or config.cache == "off"
    if config.augment and not (live or config.aug_views > 1 or config.fine_tune_epochs):
        raise UserInputError(
            f"--augment would change nothing: stage 1 trains on cached features of unaugmented "
            f"images. Add --aug-views K to cache K-1 augmented views per image, --cache off to "
            f"augment live every step, or --fine-tune-epochs N to augment while fine-tuning. "
            f"Received: augment={config.augment!r}")
    resolved = config.replace(
        data=config.data if config.data.startswith("tfds:") else str(scanned.root.resolve()),
        image_size=image_size, cut=cut, trainable_blocks="all" if scratch else None,
        cache_dir=str(cache_dir.resolve()), out=str(out.resolve()),
        **registry.resolved_source(spec, config.weights))
    return Plan(resolved, spec, base, cut, fine_tune_cut, cache_dir, scanned.classes,
                layout or one_device(config.batch_size))
