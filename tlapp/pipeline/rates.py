"""Learning rates chosen by the range test: `tlapp lr-find`, and `lr = "auto"` /
`fine_tune_lr = "auto"` inside a run (the chosen rate replaces "auto" in config.toml)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from pathlib import Path

from tlapp import config as config_lib
from tlapp.augment.ops import cached_pca
from tlapp.backbones import registry
from tlapp.config import AUTO, Config
from tlapp.errors import UserInputError
from tlapp.files import write_text
from tlapp.pipeline import stages
from tlapp.pipeline.plan import Plan, Splits, precision_policy, resolve_plan, scan_data
from tlapp.reporting.plots import plot_lr_find
from tlapp.training import fit, head, lr_find
from tlapp.training.checkpoint import Checkpoint

log = logging.getLogger(__name__)

STAGES = ("head", "fine-tune")
KEYS = {"head": "lr", "fine_tune": "fine_tune_lr"}  # the setting each stage's test picks


def run_range_test(plan: Plan, stage: str, splits: Splits, model, loader, parallel: bool,
                   plot: Path | None, **limits) -> lr_find.RangeTest:
    """The range test of `stage` ("head": stage 1, "fine_tune") with its settings; writes
    the plot when `plot` is given."""
    settings = stages.settings(plan, splits) if stage == "head" else \
        stages.fine_tune_settings(plan, splits)
    test = lr_find.range_test(model, settings, splits.count("train"), loader, parallel,
                              **limits)
    if plot is not None:
        where = "stage 1 on cached features" if stage == "head" and not plan.live else \
            "stage 1 on images" if stage == "head" else "fine-tuning on images"
        plot_lr_find(test.rates, test.losses, test.smoothed, test.suggestion, plot,
                     f"learning-rate range test: {plan.spec.name}, {where}")
    return test


def resolve_auto(plan: Plan, stage: str, splits: Splits, model, loader, parallel: bool,
                 folder: Path) -> dict:
    """When the stage's rate is "auto": runs the range test, puts the suggestion into
    `plan.config` and rewrites folder/config.toml (a resumed run then uses the recorded
    rate); writes folder/plots/lr_find_<stage>.png. Returns {stage: test summary} for
    metrics.json, or {} when the rate was given."""
    key = KEYS[stage]
    if getattr(plan.config, key) != AUTO:
        return {}
    test = run_range_test(plan, stage, splits, model, loader, parallel,
                          folder / "plots" / f"lr_find_{stage}.png")
    plan.config = plan.config.replace(**{key: test.suggestion})
    write_text(folder / "config.toml", config_lib.to_toml(plan.config))
    log.info("%s = auto: %.3g chosen by the range test (recorded in config.toml)", key,
             test.suggestion)
    return {stage: test.to_dict()}


def find_lr(config: Config, stage: str = "head", plot: str | Path | None = "lr_find.png",
            steps: int = lr_find.STEPS, min_lr: float = lr_find.MIN_LR,
            max_lr: float = lr_find.MAX_LR) -> lr_find.RangeTest:
    """`tlapp lr-find`: the range test for stage 1 (on cached features, extracting only
    what the cache lacks; on images when stage 1 is live) or, with stage="fine-tune", for
    the fine-tuning stage (stage 1 is trained first, as a run would, then the test runs on
    images). Writes `plot` and returns the test (`.suggestion`).

    Raises:
        UserInputError: an unknown stage, or limits out of range.
    """
    if stage not in STAGES:
        raise UserInputError(f"--stage must be one of {', '.join(STAGES)}. "
                             f"Received: stage={stage!r}")
    if not 0 < min_lr < max_lr or steps < 10:
        raise UserInputError(f"The range test needs 0 < min_lr < max_lr and at least 10 "
                             f"steps. Received: min_lr={min_lr}, max_lr={max_lr}, "
                             f"steps={steps}")
    if stage == "fine-tune" and not config.fine_tune_epochs:
        config = config.replace(fine_tune_epochs=1)  # plans the fine-tuning cut
    spec = registry.get_spec(config.backbone, config.preprocess)
    cache_dir = Path(config.cache_dir or config_lib.default_cache_dir()).expanduser()
    scanned = scan_data(config, cache_dir)
    limits = {"steps": steps, "min_lr": min_lr, "max_lr": max_lr}
    with precision_policy(config.mixed_precision), contextlib.ExitStack() as closing:
        work = Path(closing.enter_context(tempfile.TemporaryDirectory(prefix="tlapp-lr-")))
        plan = resolve_plan(config, spec, scanned, cache_dir, work / "run")
        models = stages.build_models(plan)
        splits = Splits.of(scanned)
        if not splits.count("train"):
            raise UserInputError(f"No training images in {scanned.root} after the split.")
        pca = cached_pca(config.augment, splits.paths["train"], splits.digests["train"],
                         plan.image_size, cache_dir)
        model, loader, parallel, val = stage_one(plan, models, scanned, splits, pca, closing)
        if stage == "head":
            return run_range_test(plan, "head", splits, model, loader, parallel,
                                  plot and Path(plot), **limits)
        resolve_auto(plan, "head", splits, model, loader, parallel, work)
        fit.fit_stage(stages.stage_one_name(plan), model,
                      stages.settings(plan, splits), splits.count("train"), loader, val,
                      Checkpoint(work / "checkpoints", models.full), parallel=parallel)
        stages.unfreeze(plan, models)
        plan.config = dataclasses.replace(plan.config, fine_tune_lr=None)
        return run_range_test(plan, "fine_tune", splits, models.full,
                              stages.image_loader(plan, splits, "train", pca), True,
                              plot and Path(plot), **limits)


def stage_one(plan: Plan, models: head.Models, scanned, splits: Splits, pca,
              closing: contextlib.ExitStack):
    """(model, train loader, parallel, val batches) of stage 1, its head standardised:
    the cached features (extracted first where missing), or images when stage 1 is live."""
    if plan.live:
        stages.adapt_live(plan, models, splits)
        return (models.full, stages.image_loader(plan, splits, "train", pca), True,
                stages.val_images(plan, splits))
    loaders, _ = stages.cached_features(plan, models, scanned, splits, pca, closing)
    features = stages.adapt_cached(plan, models, splits, loaders)
    return (models.train, loaders["train"], False,
            features["val"] if splits.count("val") else None)
