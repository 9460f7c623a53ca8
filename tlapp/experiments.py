"""Experiments: many training runs from one TOML file, sharing one feature cache.

    data = "models/demo/data"   # base settings: any key of tlapp.config.Config
    weights = "none"
    [sweep]                     # every combination of these lists (a cartesian grid)
    backbone = ["vgg16", "resnet50"]
    lr = [0.001, 0.01]
    [[runs]]                    # and/or explicit runs; each is crossed with the grid
    name = "scratch"            # optional folder name
    backbone = "lenet5"

Each run is a normal run folder OUT/<name>/, named from the settings that differ between
runs. All runs use one cache folder, so runs that share a stem (backbone, weights, cut, image
size, preprocessing) extract it once. A run folder with metrics.json is finished and skipped
when the experiment is run again; a failed run is recorded with its error and the others go
on. OUT/results.csv, OUT/results.md and OUT/plots/results.png summarise them all.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import re
import shutil
import traceback
from pathlib import Path

import keras

from tlapp import config as config_lib, pipeline
from tlapp.errors import UserInputError
from tlapp.files import write_text
from tlapp.inference.report import write_experiment_report
from tlapp.reporting import tracking
from tlapp.reporting.plots import plot_results

log = logging.getLogger(__name__)

SHARED_KEYS = ("cache_dir", "out")  # one per experiment: set at the top level only
COLUMNS = ["status", "val_accuracy", "test_accuracy", "train_s", "extract_s",
           "cache_extracted", "cache_reused", "error"]


@dataclasses.dataclass
class PlannedRun:
    name: str
    settings: dict  # the settings that tell the runs apart, defaults filled in (None: auto)
    values: dict  # everything that goes into its Config, but out and cache_dir


@dataclasses.dataclass
class ExperimentResult:
    out: Path
    keys: list[str]  # the varying settings, one results column each
    rows: list[dict]  # one per run: run, the keys, then COLUMNS
    bad_input: set[str] = dataclasses.field(default_factory=set)  # runs failed by bad input

    @property
    def exit_status(self) -> int:
        """0 if every run finished; 2 if the failures are all bad input; else 1."""
        failed = {row["run"] for row in self.rows if row["status"] == "failed"}
        if not failed:
            return 0
        return 2 if failed <= self.bad_input else 1


def expand(sweep: dict[str, list], runs: list[dict]) -> list[dict]:
    """Every [[runs]] entry (or one empty entry) combined with every point of the grid."""
    keys = list(sweep)
    grid = [dict(zip(keys, point)) for point in itertools.product(*sweep.values())]
    return [entry | point for entry in (runs or [{}]) for point in grid]


def format_value(value) -> str:
    """A setting as it appears in a run name: paths by file name, floats short."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    if "/" in text or text.endswith(".keras"):
        text = Path(text).stem
    return re.sub(r"[^\w.+-]", "_", text)


def plan_runs(base: dict, sweep: dict[str, list], runs: list[dict]) -> list[PlannedRun]:
    """Expands the grid and names each run from the settings that differ between runs
    (`key=value` joined by commas; a [[runs]] `name` stands for that entry's own settings);
    duplicates get -2, -3, ..."""
    combos = expand(sweep, runs)
    defaults = config_lib.Config().to_dict()
    effective = [defaults | base | {k: v for k, v in combo.items() if k != "name"}
                 for combo in combos]
    keys = list(dict.fromkeys([k for entry in runs for k in entry if k != "name"] + list(sweep)))
    varying = [k for k in keys
               if len({json.dumps(values.get(k), sort_keys=True) for values in effective}) > 1]
    planned, seen = [], {}
    for combo, values in zip(combos, effective):
        shown = [k for k in varying if k in combo and (k in sweep or "name" not in combo)]
        name = ",".join(([combo["name"]] if "name" in combo else [])
                        + [f"{k}={format_value(combo[k])}" for k in shown]) or "run"
        name = re.sub(r"[^\w.,=+-]", "_", str(name))
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}-{seen[name]}"
        planned.append(PlannedRun(name, {k: values.get(k) for k in varying},
                                  base | {k: v for k, v in combo.items() if k != "name"}))
    return planned


def load_experiment(path: str | Path) -> tuple[dict, dict[str, list], list[dict]]:
    """Reads and checks an experiment file: (base settings, sweep, runs).

    Raises:
        UserInputError: unknown keys or tables, a sweep value that is not a non-empty list,
            or a key set both in [[runs]] and [sweep] or per run where it must be shared.
    """
    values = config_lib.read_toml(path)
    sweep, runs = values.pop("sweep", {}), values.pop("runs", [])
    if not isinstance(sweep, dict) or not isinstance(runs, list):
        raise UserInputError(f"{path}: 'sweep' must be a table ([sweep]) and 'runs' an array "
                             f"of tables ([[runs]]).")
    values, sweep, runs = _underscores(values), _underscores(sweep), [
        _underscores(entry) for entry in runs]
    _check_keys(values, f"{path}", per_run=False)
    _check_keys(sweep, f"{path} [sweep]")
    for key, choices in sweep.items():
        if not isinstance(choices, list) or not choices:
            raise UserInputError(f"{path} [sweep]: every value must be a non-empty list. "
                                 f"Received: {key}={choices!r}")
    for entry in runs:
        _check_keys(entry, f"{path} [[runs]]", allowed=("name",))
        both = sorted(set(entry) & set(sweep))
        if both:
            raise UserInputError(f"{path}: {', '.join(both)} is set in both [[runs]] and "
                                 f"[sweep]; set each key in one place.")
    return values, sweep, runs


def _underscores(values: dict) -> dict:
    """Keys as Config spells them (TOML files may write trainable-blocks)."""
    return {key.replace("-", "_"): value for key, value in values.items()}


def _check_keys(values: dict, where: str, allowed: tuple[str, ...] = (),
                per_run: bool = True) -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            raise UserInputError(f"{where}: unknown table [{key}]. An experiment file has "
                                 f"base settings, [sweep] and [[runs]] (or [search]).")
        if key not in config_lib.FIELDS and key not in allowed:
            raise UserInputError(f"{where}: unknown key '{key}'. Valid keys: "
                                 f"{', '.join(sorted(config_lib.FIELDS))}.")
        if per_run and key in SHARED_KEYS:
            raise UserInputError(f"{where}: '{key}' is shared by all runs of an experiment; "
                                 f"set it at the top of the file (or use --out).")


def run_experiment(path: str | Path, out: str | Path | None = None) -> ExperimentResult:
    """Runs (or resumes) every run of an experiment file and writes the results tables.

    Args:
        path: the experiment TOML file.
        out: experiment folder; default the file's `out`, else models/experiments/<file stem>.

    Returns:
        The results: one row per run, trained now, skipped (finished earlier) or failed.
    """
    path = Path(path)
    base, sweep, runs = load_experiment(path)
    file_out = base.pop("out", None)
    out = Path(out or file_out or Path("models/experiments") / path.stem)
    cache_dir = Path(base.pop("cache_dir", None) or config_lib.default_cache_dir())
    cache_dir = cache_dir.expanduser().resolve()
    planned = plan_runs(base, sweep, runs)
    if any(run.values.get("track") == "mlflow" for run in planned):
        tracking.import_mlflow()  # missing: say so before anything runs
    out.mkdir(parents=True, exist_ok=True)
    if path.resolve() != (out / "experiment.toml").resolve():
        shutil.copyfile(path, out / "experiment.toml")  # what the results came from
    keys = list(dict.fromkeys(k for run in planned for k in run.settings))
    result = ExperimentResult(out, keys, [])
    log.info("experiment: %d runs in %s, feature cache %s", len(planned), out, cache_dir)
    scans: dict = {}  # one scan per data folder and split settings, shared by its runs
    # consecutive runs on one backbone build it once (the last one is kept: bounded memory)
    backbones = pipeline.Backbones(limit=1)
    with tracking.maybe_run(base.get("track") == "mlflow", out.name,  # runs log as children
                            run_id_file=out / "mlflow_run_id.txt",
                            tags={"tlapp.kind": "experiment"}) as tracker:
        if tracker:
            tracker.log_params({"experiment.runs": len(planned)} | tracking.params_of(
                {f"experiment.sweep.{k}": v for k, v in sweep.items()}))
        for number, run in enumerate(planned, 1):
            folder = out / run.name
            row = {"run": run.name, **{k: "" if run.settings[k] is None else run.settings[k]
                                       for k in keys}}
            if (folder / "metrics.json").is_file():
                metrics = json.loads((folder / "metrics.json").read_text())
                row |= _metrics_row(metrics, "skipped")
                log.info("experiment: run %d/%d %s: finished earlier, skipped (delete %s to "
                         "run it again)", number, len(planned), run.name, folder)
                changed = _changed_settings(folder, run.values)
                if changed:
                    log.warning("experiment: note: %s was trained with %s; the file now says "
                                "otherwise", run.name, changed)
            else:
                log.info("experiment: run %d/%d %s", number, len(planned), run.name)
                row |= _train(run, folder, cache_dir, result, scans, backbones)
            result.rows.append(row)
            write_results(result)
        plot_results(result.rows, out / "plots" / "results.png")
        write_results(result)  # again: report.html shows the plot
        if tracker:
            _log_summary(tracker, result)
    counts = {s: sum(r["status"] == s for r in result.rows)
              for s in ("trained", "skipped", "failed")}
    log.info("experiment: %d trained, %d skipped (finished earlier), %d failed; results in %s",
             counts["trained"], counts["skipped"], counts["failed"], out / "results.md")
    return result


def _train(run: PlannedRun, folder: Path, cache_dir: Path, result: ExperimentResult,
           scans: dict, backbones: "pipeline.Backbones") -> dict:
    keras.backend.clear_session()  # free the previous run's graphs; stable layer names
    errors = folder.parent / "errors" / f"{run.name}.txt"
    try:
        # A run of an experiment is one candidate: its SavedModel and its report's Grad-CAM
        # overlays are made on demand ('tlapp export RUN', 'tlapp report RUN'), unless the
        # file asks for them (saved_model = "on", gradcam = "on").
        config = config_lib.from_dict(
            {"saved_model": "off", "gradcam": "off"} | run.values | {"out": str(folder),
                                                    "cache_dir": str(cache_dir)},
            f"run {run.name}")
        finished = pipeline.run(config, scans=scans, backbones=backbones)
    except Exception as e:  # recorded, and the other runs go on
        message = f"{type(e).__name__}: {e}"
        if isinstance(e, UserInputError):
            result.bad_input.add(run.name)
        errors.parent.mkdir(exist_ok=True)
        write_text(errors, traceback.format_exc())
        log.warning("experiment: run %s failed (%s); continuing", run.name, message)
        return {"status": "failed", "error": message}
    errors.unlink(missing_ok=True)
    return _metrics_row(finished.metrics, "trained")


def _log_summary(tracker, result: ExperimentResult) -> None:
    """The parent MLflow run: the best run's validation accuracy and the results files."""
    done = [r for r in result.rows if r["status"] != "failed" and r["val_accuracy"] is not None]
    if done:
        tracker.log_metrics({"best_val_accuracy": max(r["val_accuracy"] for r in done),
                             "runs_failed": sum(r["status"] == "failed" for r in result.rows)})
    tracker.log_files([result.out / name for name in ("results.md", "results.csv",
                                                      "report.html", "plots")])


def _changed_settings(folder: Path, values: dict) -> str:
    """Plain numeric settings of a finished run that differ from what the file asks now."""
    try:
        recorded = config_lib.load_toml(folder / "config.toml")
    except UserInputError:
        return ""
    keys = ("epochs", "batch_size", "lr", "dropout", "seed", "image_size", "val_fraction",
            "test_fraction")
    return ", ".join(f"{k}={recorded[k]!r}" for k in keys
                     if k in values and k in recorded and values[k] != recorded[k])


def _metrics_row(metrics: dict, status: str) -> dict:
    timings, cache = metrics.get("timings", {}), metrics.get("cache", {})
    return {"status": status, "val_accuracy": metrics.get("val_accuracy"),
            "test_accuracy": metrics.get("test_accuracy"), "train_s": timings.get("train_s"),
            "extract_s": timings.get("extract_s"), "cache_extracted": cache.get("extracted"),
            "cache_reused": cache.get("reused"), "error": ""}


def write_results(result: ExperimentResult) -> None:
    """OUT/results.csv (every column) and OUT/results.md (a readable table), atomically."""
    fields = ["run", *result.keys, *COLUMNS]
    text = io.StringIO()
    writer = csv.DictWriter(text, fields, restval="")
    writer.writeheader()
    writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in result.rows])
    write_text(result.out / "results.csv", text.getvalue())
    markdown = f"# Experiment results: {result.out.name}\n\n{results_table(result)}\n"
    failed = [row for row in result.rows if row["status"] == "failed"]
    if failed:
        markdown += "\nFailed runs (tracebacks in errors/):\n\n" + "".join(
            f"- {row['run']}: {row['error']}\n" for row in failed)
    write_text(result.out / "results.md", markdown)
    header, rows = results_rows(result)
    write_experiment_report(result.out, header, rows, [row["run"] for row in result.rows])


def results_table(result: ExperimentResult) -> str:
    """A Markdown table: run, varying settings, status, accuracies, times, cache hits."""
    header, rows = results_rows(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def results_rows(result: ExperimentResult) -> tuple[list[str], list[list[str]]]:
    """The results table's header and rows, as text."""
    header = ["run", *result.keys, "status", "val acc", "test acc", "train s", "extract s",
              "cache hits"]
    rows = []
    for row in result.rows:
        cells = [row["run"], *(format_value(row[k]) if row[k] != "" else "" for k in result.keys),
                 row["status"], _percent(row.get("val_accuracy")),
                 _percent(row.get("test_accuracy")), _seconds(row.get("train_s")),
                 _seconds(row.get("extract_s"))]
        reused, extracted = row.get("cache_reused"), row.get("cache_extracted")
        cells.append("" if reused is None else f"{reused}/{reused + extracted}")
        rows.append(cells)
    return header, rows


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _seconds(value) -> str:
    return "" if value is None else f"{value:.1f}"
