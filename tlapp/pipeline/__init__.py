"""One function wires the steps: scan -> plan -> models -> feature cache -> train ->
fine-tune -> evaluate -> save.

The CLI and the Python API (`tlapp.train`) only build a Config and call `run`. The steps
live beside it: plan.py (resolving the config), stages.py (training and evaluation),
folder.py (the run folder).
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from tlapp import config as config_lib
from tlapp.augment.ops import cached_pca
from tlapp.backbones import registry
from tlapp.config import Config
from tlapp.errors import UserInputError
from tlapp.files import disk_full, is_disk_full
from tlapp.inference.report import write_report
from tlapp.inference.runs import Run
from tlapp.reporting import tracking
from tlapp.pipeline import folder, rates, stages
from tlapp.pipeline.plan import Backbones, Splits, precision_policy, resolve_plan, scan_data
from tlapp.training import distribute
from tlapp.training.checkpoint import Checkpoint
from tlapp.training.lr_find import MAX_LR, MIN_LR, STEPS, RangeTest

log = logging.getLogger(__name__)


def train(data: str | None = None, config: Config | None = None, **options) -> Run:
    """Trains a classifier on an image folder: the Python equivalent of `tlapp train`.

    Args:
        data: image folder (one subfolder per class, or train/val/test), or tfds:NAME.
        config: a base Config; `options` (any Config field) override it.

    Returns:
        The finished Run (its folder, config, labels and metrics).
    """
    values = config.to_dict() if config else {}
    values |= {"data": data} if data is not None else {}
    return run(config_lib.from_dict(values | options, "train"))


def lr_find(data: str | None = None, config: Config | None = None, stage: str = "head",
            plot: str | Path | None = "lr_find.png", steps: int = STEPS,
            min_lr: float = MIN_LR, max_lr: float = MAX_LR, **options) -> RangeTest:
    """The learning-rate range test: the Python equivalent of `tlapp lr-find`.

    Args:
        data, config, options: as for `train` (the settings of the stage tested).
        stage: "head" (stage 1, on cached features) or "fine-tune".
        plot: where the plot goes (None: no plot).
        steps, min_lr, max_lr: the test's length and range.

    Returns:
        The test: `.suggestion`, `.minimum`, `.rates`, `.losses`, `.diverged`.
    """
    values = config.to_dict() if config else {}
    values |= {"data": data} if data is not None else {}
    return rates.find_lr(config_lib.from_dict(values | options, "lr_find"), stage, plot,
                         steps, min_lr, max_lr)


def resume_config(out: str | Path) -> Config:
    """The config of an interrupted run whose --out was `out`."""
    out = Path(out).expanduser()
    config_file = folder.partial_dir(out) / "config.toml"
    if not config_file.is_file():
        finished = (out / "metrics.json").is_file()
        raise UserInputError(
            f"Nothing to resume at {out}: " + ("that run is finished." if finished else
                                               f"no interrupted run ({config_file} is missing)."))
    return config_lib.from_dict(config_lib.load_toml(config_file), str(config_file))


def run(config: Config, resume: bool = False, scans: dict | None = None,
        backbones: Backbones | None = None) -> Run:
    """Runs the whole pipeline for one config and returns the finished run.

    With resume=True, continues the interrupted run in `.OUT.partial/` from its last
    checkpoint (see `resume_config`). `scans`: scans shared by several runs (an experiment
    passes the same dict to each): the folder is scanned once per split setting.
    `backbones`: backbones kept between runs (an experiment passes the same `Backbones`
    to each): a run on one device reuses one built for the same backbone. With
    config.track == "mlflow" the run is logged to MLflow (`tlapp.reporting.tracking`).
    """
    layout = distribute.make_layout(config)  # first: multi-worker precedes any TensorFlow op
    config = config.replace(strategy=layout.name)
    spec = registry.get_spec(config.backbone, config.preprocess)
    out = Path(config.out or folder.default_out(spec.name)).expanduser()
    if config.track == "mlflow":
        tracking.import_mlflow()  # missing: say so before any folder is made
    if not layout.is_chief:  # a worker writes nothing of the run folder: no lock, no tracking
        return _run(config, spec, out, folder.worker_dir(out, resume), None, scans, layout,
                    resume, None)
    folder.check_out(out)
    with folder.run_lock(out):
        try:
            temp = folder.prepare_out(out, resume)
            with tracking.maybe_run(config.track == "mlflow", out.name,
                                    run_id_file=temp / "mlflow_run_id.txt") as tracker:
                finished = _run(config, spec, out, temp, tracker, scans, layout, resume,
                                backbones)
                if tracker:
                    tracker.log_params(tracking.params_of(finished.config.to_dict()))
                    tracker.log_metrics(finished.metrics)
                    tracker.log_run_folder(out)
            return finished
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(out.parent, "the run folder", (
                    f"Free some space, then continue with 'tlapp train --resume {out}' (the "
                    f"run resumes from its last checkpoint), or choose --out on another "
                    f"disk.")) from None
            raise


def _run(config: Config, spec, out: Path, temp: Path, tracker, scans: dict | None,
         layout: distribute.Layout, resume: bool, backbones: Backbones | None) -> Run:
    start = time.perf_counter()
    if resume:
        distribute.check_resume_layout(temp, layout)
    cache_dir = Path(config.cache_dir or config_lib.default_cache_dir()).expanduser()
    scanned = scan_data(config, cache_dir, scans)
    timings = {"scan_s": time.perf_counter() - start}
    with precision_policy(config.mixed_precision), contextlib.ExitStack() as closing, \
            layout.scope():
        if not layout.is_chief:
            closing.callback(folder.discard_worker_dir, temp)
        # A kept backbone only on one device: a strategy's variables belong to its scope.
        kept = backbones is not None and layout.name == "one" and not resume
        key = Backbones.key(config, spec)
        plan = resolve_plan(config, spec, scanned, cache_dir, out, layout,
                            base=backbones.get(key) if kept else None)
        if kept:
            backbones.keep(key, plan.base)
        models = stages.build_models(plan)
        distribute.synchronize_batchnorm(models.full, layout)
        folder.write_run_files(temp, plan, scanned)
        stages.log_model(plan, models)
        splits = Splits.of(scanned)
        if not splits.count("train"):
            raise UserInputError(f"No training images in {scanned.root} after the split.")
        pca = cached_pca(config.augment, splits.paths["train"], splits.digests["train"],
                         plan.image_size, cache_dir)
        checkpoint = Checkpoint(temp / "checkpoints", models.full)
        logger = tracker.epoch_logger if tracker else lambda stage: None
        callbacks = [c for c in (logger(stages.stage_one_name(plan)),) if c]
        tick = time.perf_counter()
        if plan.live:
            features, cache_stats = None, {"extracted": 0, "reused": 0, "mode": "off"}
            stages.adapt_live(plan, models, splits)
            auto = rates.resolve_auto(plan, "head", splits, models.full, stages.image_loader(
                plan, splits, "train", pca), True, temp)
            stages.train_live(plan, models, splits, checkpoint, temp / "logs", pca, callbacks)
        else:
            loaders, cache_stats = stages.cached_features(plan, models, scanned, splits, pca,
                                                          closing)
            timings["extract_s"] = time.perf_counter() - tick
            tick = time.perf_counter()
            features = stages.adapt_cached(plan, models, splits, loaders)
            auto = rates.resolve_auto(plan, "head", splits, models.train, loaders["train"],
                                      False, temp)
            stages.train_on_cache(plan, models, splits, loaders, features, checkpoint,
                                  temp / "logs", callbacks)
        timings["train_s"] = time.perf_counter() - tick
        if config.fine_tune_epochs:
            tick = time.perf_counter()
            stages.unfreeze(plan, models)
            auto |= rates.resolve_auto(plan, "fine_tune", splits, models.full,
                                       stages.image_loader(plan, splits, "train", pca), True,
                                       temp)
            stages.fine_tune(plan, models, splits, checkpoint, temp / "logs", pca,
                             [c for c in (logger("fine_tune"),) if c])
            timings["fine_tune_s"] = time.perf_counter() - tick
            features = None  # the stem changed: evaluate on images
        distribute.synchronize_batchnorm(models.full, layout, False)
        results, probabilities = stages.evaluate_splits(plan, models, splits, features,
                                                        scanned.classes)
        tick = time.perf_counter()
        if layout.is_chief:  # the only writer of the run folder; outside the strategy, so
            with layout.paused():  # that nothing in it waits for the other workers
                folder.save_outputs(temp, models, scanned, splits, checkpoint, results,
                                    probabilities, config.saved_model == "on")
        timings["save_export_s"] = time.perf_counter() - tick
    weights = stages.class_weights(config, splits, plan.classes)
    metrics = {
        "val_accuracy": results["val"]["accuracy"],
        "test_accuracy": results["test"]["accuracy"],
        "counts": scanned.counts(),
        "class_weight": weights and [weights[i] for i in range(plan.classes)],
        "cache": cache_stats,
        "val": results["val"],
        "test": results["test"],
        **({"thresholds": results["thresholds"]} if "thresholds" in results else {}),
        **({"calibration": {k: v for k, v in results["calibration"].items() if k != "curves"},
            "reject": results["reject"]} if "calibration" in results else {}),
        "final_epoch": checkpoint.state["history"][-1] if checkpoint.state["history"] else {},
        **({"lr_find": auto} if auto else {}),
        "distribution": layout.record(),
        "saved_model": folder.saved_model_record(config.saved_model == "on"),
        "timings": {k: round(v, 3) for k, v in timings.items()}
        | {"total_s": round(time.perf_counter() - start, 3)},
    }
    if layout.is_chief:
        write_report_safely(temp, models.full if config.gradcam == "on" else None, metrics,
                            out.name)
        folder.finish_run(temp, out, metrics)
    distribute.barrier(layout)  # a worker that exits early aborts the others' collectives
    log.info("done: val accuracy %s, test accuracy %s; run folder %s",
             _percent(metrics["val_accuracy"]), _percent(metrics["test_accuracy"]), out)
    return Run(out, plan.config, scanned.classes, metrics, models.full)


def write_report_safely(temp: Path, model, metrics: dict, name: str) -> None:
    """report.html; a failure there is reported and never costs the finished run."""
    try:
        write_report(temp, model, metrics, name)
    except Exception as error:  # noqa: BLE001 - the run itself is complete
        log.warning("report: report.html was not written (%s: %s); 'tlapp report RUN' "
                    "writes it later", type(error).__name__, error)


def _percent(value: float | None) -> str:
    return "n/a (no images)" if value is None else f"{100 * value:.1f}%"
