"""Plots as PNG files: training curves, confusion matrix, an experiment's results.

Figures are made with `matplotlib.figure.Figure` (no pyplot state, no backend switching),
and written atomically. `draw_aside` draws a list of them in a child process; matplotlib
is imported by the first figure (a run that draws aside never imports it: 0.2-0.3 s).
"""
from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from tlapp.files import write_atomic

log = logging.getLogger(__name__)


def new_figure(**options):
    """A matplotlib.figure.Figure(**options)."""
    from matplotlib.figure import Figure

    return Figure(**options)


def save_figure(figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    write_atomic(path, lambda temp: figure.savefig(temp, dpi=100, format="png"))


def plot_history(rows: list[dict], path: str | Path) -> None:
    """Loss and accuracy per epoch, train and val, all stages in sequence with a dotted line
    where a stage starts."""
    epochs = list(range(1, len(rows) + 1))
    starts = [(i + 1, row["stage"]) for i, row in enumerate(rows)
              if i == 0 or row["stage"] != rows[i - 1]["stage"]]
    figure = new_figure(figsize=(10, 4))
    axes = figure.subplots(1, 2)
    for axis, metric in zip(axes, ("loss", "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = [row.get(prefix + metric) for row in rows]
            if any(v is not None for v in values):
                axis.plot(epochs, [float("nan") if v is None else v for v in values], style,
                          label=(prefix or "train_") + metric)
        for epoch, stage in starts:
            if epoch > 1:
                axis.axvline(epoch - 0.5, color="gray", linestyle=":")
            axis.annotate(stage, (max(epoch - 0.5, 1), 1), xycoords=("data", "axes fraction"),
                          xytext=(3, -12), textcoords="offset points", fontsize=8, color="gray")
        axis.set_xlabel("epoch (all stages)")
        axis.set_title(metric)
        axis.legend()
    save_figure(figure, path)


def plot_confusion(matrix: list[list[int]], classes: list[str], path: str | Path) -> None:
    """A labelled confusion matrix (rows: true class, columns: predicted)."""
    n = len(classes)
    side = min(4 + 0.35 * n, 24)
    figure = new_figure(figsize=(side, side))
    axis = figure.subplots()
    axis.imshow(np.asarray(matrix), cmap="Blues")
    axis.set_xticks(range(n), classes, rotation=90, fontsize=max(5, 10 - n // 10))
    axis.set_yticks(range(n), classes, fontsize=max(5, 10 - n // 10))
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                axis.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=8)
    save_figure(figure, path)


def plot_results(rows: list[dict], path: str | Path) -> None:
    """An experiment's runs side by side: val and test accuracy, and extraction and training
    seconds (failed runs appear with empty bars)."""
    def values(key):
        return [float("nan") if row.get(key) is None else row[key] for row in rows]

    names = [row["run"] + (" (failed)" if row["status"] == "failed" else "") for row in rows]
    y = np.arange(len(rows))
    figure = new_figure(figsize=(12, 1.5 + 0.45 * len(rows)))
    axes = figure.subplots(1, 2, sharey=True)
    for offset, key in ((-0.2, "val_accuracy"), (0.2, "test_accuracy")):
        axes[0].barh(y + offset, values(key), height=0.4, label=key.replace("_", " "))
    axes[0].set_xlim(0, 1)
    axes[0].set_title("accuracy")
    extract, train = values("extract_s"), values("train_s")
    axes[1].barh(y, extract, label="extraction (s)")
    axes[1].barh(y, train, left=np.nan_to_num(extract), label="training (s)")
    axes[1].set_title("time")
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    for axis in axes:
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=8)
    save_figure(figure, path)


def plot_reliability(curves: dict[str, tuple], path: str | Path) -> None:
    """Reliability diagrams, one per split: accuracy against mean confidence per bin, before
    and after calibration. `curves`: split -> {"before": (confidence, accuracy, counts),
    "after": (...)} with one entry per non-empty bin."""
    figure = new_figure(figsize=(4.5 * len(curves), 4.2))
    axes = np.atleast_1d(figure.subplots(1, len(curves)))
    for axis, (name, kinds) in zip(axes, curves.items()):
        axis.plot([0, 1], [0, 1], ":", color="gray", label="perfect")
        for kind, style in (("before", "o--"), ("after", "s-")):
            confidence, accuracy, _ = kinds[kind]
            axis.plot(confidence, accuracy, style, label=kind)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_xlabel("confidence (top probability)")
        axis.set_ylabel("accuracy")
        axis.set_title(f"{name} split")
        axis.legend(loc="upper left")
    save_figure(figure, path)


CURVE_POINTS = 2000  # a curve of one point per image is drawn through this many of them


def curve_points(n: int) -> np.ndarray:
    """Indices of at most CURVE_POINTS points of an n-point curve, first and last included."""
    return np.unique(np.linspace(0, n - 1, min(n, CURVE_POINTS)).astype(int))


def plot_coverage(coverage: np.ndarray, accuracy: np.ndarray, path: str | Path,
                  chosen: tuple[float, float] | None = None) -> None:
    """Accuracy on the most confident images against the share of images kept; `chosen`
    (coverage, accuracy) marks the run's reject threshold."""
    figure = new_figure(figsize=(5, 4))
    axis = figure.subplots()
    points = curve_points(len(coverage))
    axis.plot(np.asarray(coverage)[points], np.asarray(accuracy)[points], "-")
    if chosen is not None and chosen[1] is not None:
        axis.plot([chosen[0]], [chosen[1]], "o", label="--reject-below")
        axis.legend(loc="lower left")
    axis.set_xlim(0, 1.02)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("coverage (share of images answered)")
    axis.set_ylabel("accuracy on the answered images")
    save_figure(figure, path)


def plot_explanation(pixels: np.ndarray, heatmap: np.ndarray, top: list[tuple[str, float]],
                     title: str, path: str | Path) -> None:
    """An image, its Grad-CAM heatmap over it, and the top classes with probabilities."""
    figure = new_figure(figsize=(9, 3.4))
    axes = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.1]})
    axes[0].imshow(pixels)
    axes[0].set_title(title[:40], fontsize=9)
    axes[1].imshow(pixels)
    axes[1].imshow(heatmap, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    axes[1].set_title("Grad-CAM", fontsize=9)
    for axis in axes[:2]:
        axis.axis("off")
    names = [name for name, _ in top][::-1]
    axes[2].barh(range(len(top)), [p for _, p in top][::-1])
    axes[2].set_yticks(range(len(top)), names, fontsize=8)
    axes[2].set_xlim(0, 1)
    axes[2].set_title("top classes", fontsize=9)
    save_figure(figure, path)


def plot_lr_find(rates: list[float], losses: list[float], smoothed: list[float],
                 suggestion: float, path: str | Path, title: str = "") -> None:
    """The range test: loss against learning rate (log scale), raw and smoothed, with the
    suggested rate marked."""
    figure = new_figure(figsize=(7, 4.5))
    axis = figure.subplots()
    axis.plot(rates, losses, color="lightgray", label="loss per step")
    axis.plot(rates, smoothed, label="smoothed loss")
    axis.axvline(suggestion, color="tab:red", linestyle="--",
                 label=f"suggested rate {suggestion:.2e}")
    axis.set_xscale("log")
    low, high = min(smoothed), max(smoothed[0], min(smoothed) * 1.5)
    axis.set_ylim(low - 0.1 * (high - low) - 1e-3, high + 0.5 * (high - low) + 1e-3)
    axis.set_xlabel("learning rate (log scale)")
    axis.set_ylabel("training loss")
    axis.set_title(title or "learning-rate range test")
    axis.legend()
    save_figure(figure, path)


def plot_search(trials: list[dict], path: str | Path) -> None:
    """A search's trials in order: validation accuracy of each (pruned ones at their last
    report, in gray; failed ones left out) and the best so far."""
    from matplotlib.ticker import MaxNLocator

    figure = new_figure(figsize=(8, 4.5))
    axis = figure.subplots()
    best, running = None, []
    for trial in trials:
        value = trial.get("val_accuracy")
        if trial["state"] == "complete" and value is not None:
            best = value if best is None else max(best, value)
        running.append(float("nan") if best is None else best)
    for state, color in (("complete", "tab:blue"), ("pruned", "gray")):
        chosen = [t for t in trials if t["state"] == state and t.get("val_accuracy") is not None]
        axis.scatter([t["trial"] for t in chosen], [t["val_accuracy"] for t in chosen],
                     color=color, label=state, zorder=3)
    axis.step([t["trial"] for t in trials], running, where="post", color="tab:green",
              label="best so far")
    axis.set_ylim(0, 1.02)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_title("search: validation accuracy per trial")
    axis.set_xlabel("trial")
    axis.set_ylabel("validation accuracy")
    axis.legend(loc="lower right")
    save_figure(figure, path)


CHILD_TIMEOUT = 600  # seconds; a child that takes longer is stopped and its plots drawn here


def draw_aside(calls: list[tuple[Callable, tuple]], work: Path) -> Callable[[], None]:
    """Starts drawing `calls` (a plot function of this module, its arguments) in a child
    process that imports matplotlib, not TensorFlow, so that a second core draws while this
    process goes on (a run's plots take about a second, under the GIL otherwise). Returns
    `finish()`, which waits for the child and draws here whatever it did not: a child that
    could not start or failed costs time, never a plot. `work`: a folder for the calls'
    file while the child reads it."""
    jobs = work / ".plots.pickle"
    child, reason = None, ""
    try:
        jobs.write_bytes(pickle.dumps([(plot.__name__, args) for plot, args in calls]))
        home = str(Path(__file__).resolve().parents[2])  # the child imports this tlapp
        path = os.pathsep.join([home, *filter(None, [os.environ.get("PYTHONPATH")])])
        child = subprocess.Popen([sys.executable, "-m", __name__, str(jobs)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, env=os.environ | {"PYTHONPATH": path})
    except OSError as error:
        reason = str(error)

    def finish() -> None:
        nonlocal reason
        if child is not None:
            try:
                reason = child.communicate(timeout=CHILD_TIMEOUT)[1]
            except subprocess.TimeoutExpired:
                child.kill()
                reason = child.communicate()[1] + b" (timed out)"
            reason = reason.decode(errors="replace").strip()[-2000:]
        jobs.unlink(missing_ok=True)
        done = child is not None and child.returncode == 0
        if not done:
            log.debug("plots: the child process failed (%s); drawing them here", reason)
            for plot, args in calls:
                plot(*args)

    return finish


if __name__ == "__main__":  # draw_aside's child: python -m tlapp.reporting.plots JOBS
    for name, arguments in pickle.loads(Path(sys.argv[1]).read_bytes()):
        globals()[name](*arguments)
