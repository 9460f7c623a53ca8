"""The run folder: written as `.OUT.partial/` while the run lasts, renamed to OUT when complete."""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from tlapp import config as config_lib
from tlapp.data.scan import ScannedData
from tlapp.errors import UserInputError
from tlapp.files import write_json, write_text
from tlapp.inference.evaluate import write_reports
from tlapp.inference.export import export_saved_model
from tlapp.pipeline.plan import Plan, Splits
from tlapp.reporting.plots import plot_history
from tlapp.training import distribute, fit, head
from tlapp.training.checkpoint import Checkpoint


def default_out(backbone: str) -> Path:
    return Path("models") / f"{backbone}-{time.strftime('%Y%m%d-%H%M%S')}"


def partial_dir(out: Path) -> Path:
    """Where a run is written until it is complete (then renamed to `out`)."""
    return out.with_name(f".{out.name}.partial")


def prepare_out(out: Path, resume: bool) -> Path:
    """Checks the run folder is free (unless resuming) and returns its partial folder."""
    temp = partial_dir(out)
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise UserInputError(f"Output folder {out} already exists and is not empty. "
                                 f"Choose another --out or delete it.")
        shutil.rmtree(temp, ignore_errors=True)
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
                 checkpoint: Checkpoint, results: dict, probabilities: dict) -> None:
    """history.csv, plots, evaluation reports, model.keras and the SavedModel."""
    history = checkpoint.state["history"]
    fit.write_history(temp / "history.csv", history)
    plot_history(history, temp / "plots" / "training_curves.png")
    if results["test"]["count"]:
        write_reports(temp, results["test"], [s.path for s in scanned.split("test")],
                      splits.labels["test"], probabilities["test"], scanned.classes)
    models.full.save(temp / "model.keras")
    export_saved_model(models.full, scanned.classes, temp / "saved_model")
    shutil.rmtree(temp / "checkpoints", ignore_errors=True)  # the run is complete
    (temp / distribute.LAYOUT_FILE).unlink(missing_ok=True)  # in metrics.json from now on


def finish_run(temp: Path, out: Path, metrics: dict) -> None:
    """metrics.json last, then the partial folder becomes the run folder."""
    write_json(temp / "metrics.json", metrics)
    if out.exists():
        out.rmdir()  # checked empty by prepare_out
    out.parent.mkdir(parents=True, exist_ok=True)
    temp.rename(out)
