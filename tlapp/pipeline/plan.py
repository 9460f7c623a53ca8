"""What a run will do: its config resolved against the backbone and the data, and the splits."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import keras
import numpy as np

from tlapp.backbones import cuts, registry
from tlapp.backbones.spec import BackboneSpec
from tlapp.config import Config
from tlapp.constants import SPLITS
from tlapp.data.scan import ScannedData, resolve_data, scan_folder
from tlapp.errors import UserInputError
from tlapp.training.distribute import Layout


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


@dataclasses.dataclass
class Splits:
    """Files, labels and content hashes of the train, val and test splits."""

    paths: dict[str, list[Path]]
    labels: dict[str, np.ndarray]
    digests: dict[str, list[str]]

    @classmethod
    def of(cls, scanned: ScannedData) -> "Splits":
        samples = {name: scanned.split(name) for name in SPLITS}
        return cls({name: [scanned.root / s.path for s in samples[name]] for name in SPLITS},
                   {name: np.array([s.label for s in samples[name]], np.int32)
                    for name in SPLITS},
                   {name: [s.sha256 for s in samples[name]] for name in SPLITS})

    def count(self, name: str) -> int:
        return len(self.labels[name])


def scan_data(config: Config, cache_dir: Path) -> ScannedData:
    if not config.data:
        raise UserInputError("No data given: pass an image folder (or tfds:NAME) as DATA.")
    root = resolve_data(config.data, cache_dir)
    return scan_folder(root, config.val_fraction, config.test_fraction,
                       max_pixels=config.max_pixels, cache_dir=cache_dir)


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
                 out: Path, layout: Layout) -> Plan:
    """Builds the backbone and turns every "resolve a default" of the config into a value."""
    image_size = config.image_size or spec.default_size
    base = registry.build_backbone(spec, config.weights, image_size, config.seed)
    cut = cuts.resolve_cut(spec, base, config.cut, config.trainable_blocks)
    scratch = cut == cuts.INPUT_CUT  # every layer trains, on images
    cut = None if scratch else cut
    fine_tune_cut = cuts.resolve_fine_tune_cut(
        spec, base, cut, config.fine_tune_blocks, config.fine_tune_cut) \
        if config.fine_tune_epochs else None
    resolved = config.replace(
        data=config.data if config.data.startswith("tfds:") else str(scanned.root.resolve()),
        image_size=image_size, cut=cut, trainable_blocks="all" if scratch else None,
        cache_dir=str(cache_dir.resolve()), out=str(out.resolve()),
        **registry.resolved_source(spec, config.weights))
    return Plan(resolved, spec, base, cut, fine_tune_cut, cache_dir, scanned.classes, layout)
