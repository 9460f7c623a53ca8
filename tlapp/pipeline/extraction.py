"""`tlapp extract`: fill the feature cache, or one shard of it, without training.

Shards partition the images by content hash (stable as images are added, so a rerun
resumes), so any scheduler can run them side by side: N processes on one machine, a Slurm
array, a Kubernetes indexed job, or the tasks of a TF_CONFIG cluster. Each writes its own
shard files and records into the shared entry (no lock spans processes or machines), and
runs no strategy and no collectives; `tlapp train` afterwards extracts only what is missing.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

from tlapp import config as config_lib
from tlapp.augment.ops import cached_pca
from tlapp.backbones import registry
from tlapp.config import Config
from tlapp.errors import UserInputError
from tlapp.features.extract import extract_features
from tlapp.pipeline import stages
from tlapp.pipeline.plan import Splits, precision_policy, resolve_plan, scan_data
from tlapp.training import cluster

log = logging.getLogger(__name__)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """"I/N" -> (I, N) with 0 <= I < N; None -> the TF_CONFIG task (or no sharding)."""
    if text is None:
        tasks = cluster.cluster_tasks()
        return (cluster.read_task().index, tasks) if tasks > 1 else None
    found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not found or not int(found[1]) < int(found[2]):
        raise UserInputError(f"--shard is I/N with 0 <= I < N (this process extracts part I "
                             f"of N), e.g. 0/4. Received: shard={text!r}")
    return int(found[1]), int(found[2])


def in_shard(digest: str, shard: tuple[int, int]) -> bool:
    """Whether the image with this content hash belongs to shard I of N."""
    return int(digest[:16], 16) % shard[1] == shard[0]


def extract(config: Config, shard: tuple[int, int] | None = None) -> dict:
    """Extracts the cache rows of every image of `config.data` (or of shard I of N) for the
    stem `config` defines; returns {"extracted", "reused", "repaired", "entry", "images",
    "shard"}."""
    spec = registry.get_spec(config.backbone, config.preprocess)
    cache_dir = Path(config.cache_dir or config_lib.default_cache_dir()).expanduser()
    scanned = scan_data(config, cache_dir)
    with precision_policy(config.mixed_precision):
        plan = resolve_plan(config, spec, scanned, cache_dir, cache_dir / "extract")
        if plan.live:
            why = "--cache off" if config.cache == "off" else \
                "no frozen stem (training from scratch)"
            raise UserInputError(f"Nothing to extract: with {why} stage 1 trains on images, "
                                 f"not on cached activations.")
        models = stages.build_models(plan)
        splits = Splits.of(scanned)
        pca = cached_pca(config.augment, splits.paths["train"], splits.digests["train"],
                         plan.image_size, cache_dir)
        mine = scanned if shard is None else dataclasses.replace(
            scanned, samples=[s for s in scanned.samples if in_shard(s.sha256, shard)])
        cache = stages.feature_cache(plan, models)
        log.info("extract: %s images%s into %s", f"{len(mine.samples):,}",
                 f" (shard {shard[0]}/{shard[1]} of {len(scanned.samples):,})" if shard else "",
                 cache.dir)
        stats = extract_features(cache, models.stem, mine, plan.image_size, config.batch_size,
                                 pca=pca)
    return stats | {"entry": cache.dir.name, "images": len(mine.samples),
                    "shard": f"{shard[0]}/{shard[1]}" if shard else None}
