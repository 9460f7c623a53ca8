"""The run folder: written as `.OUT.partial/` while the run lasts, renamed to OUT when complete."""
from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from tlapp import config as config_lib
from tlapp.data.scan import ScannedData
from tlapp.errors import UserInputError
from tlapp.files import write_json, write_text
from tlapp.inference import calibration, multilabel
from tlapp.inference.evaluate import write_reports
from tlapp.inference.export import export_saved_model
from tlapp.pipeline.plan import Plan, Splits
from tlapp.reporting.model_card import write_cards_safely
from tlapp.reporting.plots import (curve_points, draw_aside, plot_coverage, plot_history,
                                   plot_reliability)
from tlapp.training import distribute, fit, head
from tlapp.training.checkpoint import Checkpoint

log = logging.getLogger(__name__)


def default_out(backbone: str) -> Path:
    return Path("models") / f"{backbone}-{time.strftime('%Y%m%d-%H%M%S')}"


NAME_LIMIT = 240  # bytes of --out's last part: ".NAME.partial" must fit in 255


def partial_dir(out: Path) -> Path:
    """Where a run is written until it is complete (then renamed to `out`)."""
    return out.with_name(f".{out.name}.partial")


def check_out(out: Path) -> None:
    """A run folder name that tlapp can write (and its partial folder and lock beside it)."""
    size = len(os.fsencode(out.name))
    if size > NAME_LIMIT:
        raise UserInputError(f"The last part of --out is {size} bytes long; it must be at most "
                             f"{NAME_LIMIT} (tlapp writes .NAME.partial beside it). Received: "
                             f"out={str(out)[:80]!r}...")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out must be a folder, but {out} is a file. Choose another "
                             f"--out. Received: out={str(out)!r}")


@contextlib.contextmanager
def run_lock(out: Path):
    """Holds the lock of run folder `out` (`.OUT.lock` beside it) for the block, so that two
    processes never write one run. A lock left by a dead process is taken over.

    Raises:
        UserInputError: another live process holds it (the message names its PID).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserInputError(
                f"Another tlapp process (PID {holder}) is writing the run {out}. Wait for it "
                f"to finish (or stop it), or choose another --out.") from None
        try:  # the holder before us may have removed the file after we opened it
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def prepare_out(out: Path, resume: bool) -> Path:
    """Checks the run folder is free (unless resuming) and returns its partial folder.
    Call it holding `run_lock(out)`."""
    temp = partial_dir(out)
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise UserInputError(f"Output folder {out} already exists and is not empty. "
                                 f"Choose another --out or delete it.")
        shutil.rmtree(temp, ignore_errors=True)  # an interrupted run that was not resumed
    return temp


def worker_dir(out: Path, resume: bool) -> Path:
    """The folder of a multi-worker run on a worker other than the chief, which alone writes
    the run folder: a private temporary folder (deleted with `discard_worker_dir`), holding a
    copy of the chief's partial folder when resuming (so --out must be on a file system that
    every worker shares)."""
    scratch = Path(tempfile.mkdtemp(prefix="tlapp-worker-")) / "run"
    if resume:
        shutil.copytree(partial_dir(out), scratch, ignore=shutil.ignore_patterns("logs"))
    return scratch


def discard_worker_dir(temp: Path) -> None:
    shutil.rmtree(temp.parent, ignore_errors=True)


def write_run_files(temp: Path, plan: Plan, scanned: ScannedData) -> None:
    """config.toml, labels.txt, split.json and distribution.json: written first, so a run
    can be resumed."""
    temp.mkdir(parents=True, exist_ok=True)
    write_text(temp / "config.toml", config_lib.to_toml(plan.config))
    write_text(temp / "labels.txt", "\n".join(scanned.classes) + "\n")
    write_text(temp / "split.json", json.dumps(scanned.split_json(), indent=1) + "\n")
    write_json(temp / distribute.LAYOUT_FILE, plan.layout.record())  # checked by --resume


def save_outputs(temp: Path, models: head.Models, scanned: ScannedData, splits: Splits,
                 checkpoint: Checkpoint, results: dict, probabilities: dict,
                 saved_model: bool = True) -> None:
    """history.csv, plots, evaluation reports, model.keras and (unless saved_model=False)
    the SavedModel, which `tlapp export RUN` can write later from model.keras.

    The SavedModel is traced and written in a thread while the rest is written (its
    tracing and serialisation are the longest part: seconds for a ResNet-50); it is
    finished, or its error raised, before this returns."""
    thresholds, reject = results.get("thresholds"), results.get("reject")
    with concurrent.futures.ThreadPoolExecutor(1, "tlapp-export") as pool:
        export = pool.submit(
            export_saved_model, models.full, scanned.classes, temp / "saved_model",
            thresholds=thresholds, reject_below=reject["reject_below"] if reject else None
        ) if saved_model else None
        _save_files(temp, models, scanned, splits, checkpoint, results, probabilities)
        if export is not None:
            export.result()  # its error, if any, is the run's
    shutil.rmtree(temp / "checkpoints", ignore_errors=True)  # the run is complete
    (temp / distribute.LAYOUT_FILE).unlink(missing_ok=True)  # in metrics.json from now on


def _save_files(temp: Path, models: head.Models, scanned: ScannedData, splits: Splits,
                checkpoint: Checkpoint, results: dict, probabilities: dict) -> None:
    """Everything of `save_outputs` but the SavedModel. The plots are drawn in a child
    process (`draw_aside`) while model.keras is written."""
    plots = []

    def draw(plot, *args):
        plots.append((plot, args))

    history = checkpoint.state["history"]
    fit.write_history(temp / "history.csv", history)
    draw(plot_history, history, temp / "plots" / "training_curves.png")
    thresholds = results.get("thresholds")
    if thresholds is not None:  # multi-label: the decisions need the tuned thresholds
        multilabel.write_thresholds(temp, scanned.classes, thresholds)
        if results["test"]["count"]:
            multilabel.write_label_report(temp, results["test"])
    elif results["test"]["count"]:
        write_reports(temp, results["test"], [s.path for s in scanned.split("test")],
                      splits.labels["test"], probabilities["test"], scanned.classes, draw)
    reject = results.get("reject")
    if thresholds is None:  # calibration and coverage are of one label per image
        write_decision_plots(temp, results.get("calibration"), reject, probabilities, splits,
                             draw)
    if reject is not None:
        write_json(temp / calibration.REJECT_FILE, {
            "reject_below": reject["reject_below"], "chosen": reject["chosen"],
            "keep": reject["keep"]})
    finish_plots = draw_aside(plots, temp)
    models.full.save(temp / "model.keras")
    finish_plots()


def write_decision_plots(temp: Path, report: dict | None, reject: dict | None,
                         probabilities: dict, splits: Splits,
                         draw: Callable = lambda plot, *args: plot(*args)) -> None:
    """plots/reliability.png (before and after calibration) and plots/coverage.png
    (accuracy against the share answered, on test, else val). `draw(plot, *args)` draws
    a plot (now, or queued for `draw_aside`)."""
    if report and report.get("curves"):
        temperature = report["temperature"]
        draw(plot_reliability, {name: {
            "before": calibration.reliability(p, labels),
            "after": calibration.reliability(calibration.scale(p, temperature), labels)}
            for name, (p, labels) in report["curves"].items()},
            temp / "plots" / "reliability.png")
    name = "test" if probabilities.get("test") is not None else "val"
    if probabilities.get(name) is not None:
        coverage, accuracy = calibration.coverage_curve(probabilities[name], splits.labels[name])
        points = curve_points(len(coverage))  # the child gets what it draws
        chosen = reject and reject.get(name)
        draw(plot_coverage, coverage[points], accuracy[points], temp / "plots" / "coverage.png",
             (chosen["coverage"], chosen["selective_accuracy"]) if chosen else None)


def finish_run(temp: Path, out: Path, metrics: dict) -> None:
    """metrics.json last (then MODEL_CARD.md, made from the files), then the partial folder
    becomes the run folder; nothing that appeared at `out` meanwhile is replaced."""
    write_json(temp / "metrics.json", metrics)
    write_cards_safely(temp, out.name)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        raise UserInputError(f"{out} appeared while the run was training, so the finished run "
                             f"was left in {temp}: move it where you want it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    temp.rename(out)


def saved_model_record(written: bool) -> dict:
    """metrics.json's "saved_model": whether RUN/saved_model was written, and if not, how."""
    if written:
        return {"written": True, "path": "saved_model"}
    return {"written": False, "path": None,
            "note": "saved_model = 'off': 'tlapp export RUN' writes RUN/saved_model from "
                    "model.keras"}
