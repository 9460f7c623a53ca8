"""`tlapp experiment FILE` for a file with a [search] table: trials on the shared cache,
pruning, resume, the best configuration's one evaluation on the test split."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import traceback
from pathlib import Path

import keras

from tlapp import config as config_lib, pipeline
from tlapp.errors import UserInputError
from tlapp.files import write_text
from tlapp.pipeline.trials import TrialRunner
from tlapp.reporting import tracking
from tlapp.search import results, study as study_lib
from tlapp.search.space import SearchSpec, parse_search

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SearchResult:
    out: Path
    spec: SearchSpec
    rows: list[dict]  # one per trial
    best: dict | None  # the best trial's row
    best_run: Path | None  # its final run (test split evaluated once)
    test_accuracy: float | None
    bad_input: bool = False  # no trial finished, and every failure was bad input

    @property
    def exit_status(self) -> int:
        if self.best_run is not None:
            return 0
        return 2 if self.bad_input else 1


def load_search(path: str | Path) -> tuple[dict, SearchSpec]:
    """Reads an experiment file with a [search] table: (base settings, search spec).

    Raises:
        UserInputError: unknown keys or tables, [sweep] or [[runs]] beside [search], or a
            bad [search] table (see `parse_search`).
    """
    values = config_lib.read_toml(path)
    table = values.pop("search")
    for key in ("sweep", "runs"):
        if key in values:
            raise UserInputError(f"{path}: a file with [search] cannot also have [{key}]: "
                                 f"a search draws its own runs. Remove one of them.")
    base = {key.replace("-", "_"): value for key, value in values.items()}
    for key, value in base.items():
        if isinstance(value, dict) or key not in config_lib.FIELDS:
            raise UserInputError(f"{path}: unknown {'table' if isinstance(value, dict) else 'key'}"
                                 f" '{key}'. A search file has base settings (Config keys: "
                                 f"{', '.join(sorted(config_lib.FIELDS))}) and [search].")
    config_lib.from_dict(base, str(path))  # the base settings alone must be valid
    return base, parse_search(table, base, str(path))


def run_search(path: str | Path, out: str | Path | None = None) -> SearchResult:
    """Runs (or continues) the search of an experiment file, then trains the best
    configuration once more in OUT/best-trial-N/, evaluating the test split there only.

    Writes OUT/study.db (the Optuna study), OUT/results.csv, OUT/results.md,
    OUT/plots/search.png and OUT/best.toml.
    """
    path = Path(path)
    base, spec = load_search(path)
    out = Path(out or base.pop("out", None) or Path("models/experiments") / path.stem)
    base.pop("out", None)
    cache_dir = Path(base.pop("cache_dir", None) or config_lib.default_cache_dir())
    base["cache_dir"] = str(cache_dir.expanduser().resolve())
    names = [p.name for p in spec.params]
    study_lib.import_optuna()
    if base.get("track") == "mlflow":
        tracking.import_mlflow()  # missing: say so before the folder is made
    with study_lib.search_lock(out), _quiet_retracing():
        write_text(out / "experiment.toml", path.read_text()) \
            if path.resolve() != (out / "experiment.toml").resolve() else None
        study = study_lib.open_study(spec, out / "study.db")
        retried = study_lib.recover_interrupted(study)
        if retried:
            log.warning("search: trial(s) %s were interrupted (the process died); their "
                        "parameters are tried again", ", ".join(map(str, retried)))
        log.info("search: %s, %d trials (%d done), %s; folder %s", spec.method, spec.trials,
                 study_lib.counted(study), "; ".join(p.describe() for p in spec.params), out)
        with tracking.maybe_run(base.get("track") == "mlflow", out.name,
                                run_id_file=out / "mlflow_run_id.txt",
                                tags={"tlapp.kind": "search"}) as tracker:
            if tracker:
                tracker.log_params({"search." + k: v for k, v in
                                    dataclasses.asdict(spec).items() if k != "params"}
                                   | {f"search.{p.name}": p.describe() for p in spec.params})
            if study_lib.counted(study) < spec.trials:
                with TrialRunner(config_lib.from_dict(base, str(path))) as runner:
                    while study_lib.counted(study) < spec.trials:
                        _run_trial(study, spec, base, runner, out, tracker)
                with contextlib.suppress(OSError):  # empty unless a trial kept a plot
                    (out / "trials").rmdir()
            return _finish(study, spec, base, out, names, tracker)


def _run_trial(study, spec: SearchSpec, base: dict, runner: TrialRunner, out: Path,
               tracker) -> None:
    from optuna import TrialPruned
    from optuna.trial import TrialState

    trial = study.ask()
    params = {p.name: p.suggest(trial) for p in spec.params}
    number = trial.number
    log.info("search: trial %d (%d/%d): %s", number, study_lib.counted(study) + 1,
             spec.trials, _describe(params))
    reporter = PruningReporter(trial)
    with tracking.maybe_run(tracker is not None, f"trial-{number}",
                            tags={"tlapp.trial": number}) as child:
        def callbacks(stage):
            return [reporter] + ([child.epoch_logger(stage)] if child else [])

        try:
            config = config_lib.from_dict(base | params, f"trial {number}")
            if child:  # the whole resolved config, as a run's parameters are
                child.log_params(tracking.params_of(config.to_dict()) | {"trial": number})
            outcome = runner.train(config, out / "trials" / f"trial-{number:03d}", callbacks)
        except TrialPruned:
            trial.set_user_attr("epochs", reporter.epochs)
            study.tell(trial, state=TrialState.PRUNED)
            log.info("search: trial %d pruned after %d epochs (val accuracy %.3f, below the "
                     "median of earlier trials)", number, reporter.epochs, reporter.last)
            child and child.set_tags({"tlapp.state": "pruned"})
            return
        except KeyboardInterrupt:
            study_lib.recover_interrupted(study)  # tried again first on the next run
            raise
        except Exception as e:  # recorded; the search goes on
            message = f"{type(e).__name__}: {e}"
            trial.set_user_attr("error", message)
            write_text(_errors(out, number), traceback.format_exc())
            study.tell(trial, state=TrialState.FAIL)
            log.warning("search: trial %d failed (%s); continuing", number, message)
            child and child.set_tags({"tlapp.state": "failed"})
            return
        trial.set_user_attr("epochs", len(outcome.history))
        trial.set_user_attr("seconds", round(outcome.seconds, 3))
        if outcome.config.lr != params.get("lr", outcome.config.lr):
            trial.set_user_attr("lr_chosen", outcome.config.lr)
        study.tell(trial, outcome.val_accuracy or 0.0)
        log.info("search: trial %d: val accuracy %.3f in %.1f s", number,
                 outcome.val_accuracy or 0.0, outcome.seconds)
        if child:
            child.log_metrics({"val_accuracy": outcome.val_accuracy or 0.0,
                               "seconds": outcome.seconds, "epochs": len(outcome.history)})
            if outcome.config.lr != config.lr:  # lr = "auto": the rate the range test chose
                child.log_params({"lr_chosen": outcome.config.lr})
            # the trial as a ready-to-run config; no run folder is kept for a trial
            child.log_text(config_lib.to_toml(outcome.config.replace(out=None)),
                           "config.toml")
            child.log_files([out / "trials" / f"trial-{number:03d}"])  # range-test plots
            child.set_tags({"tlapp.state": "complete"})


class PruningReporter(keras.callbacks.Callback):
    """Reports each epoch's validation accuracy to the trial (steps counted across stages)
    and ends the trial when the pruner says so."""

    def __init__(self, trial):
        super().__init__()
        self.trial, self.epochs, self.last = trial, 0, 0.0

    def on_epoch_end(self, epoch, logs=None):
        from optuna import TrialPruned

        self.epochs += 1
        value = (logs or {}).get("val_accuracy")
        if value is None:
            return
        self.last = float(value)
        self.trial.report(self.last, step=self.epochs)
        if self.trial.should_prune():
            raise TrialPruned(f"pruned after epoch {self.epochs}")


@contextlib.contextmanager
def _quiet_retracing():
    """Every trial builds and compiles a new head, which TensorFlow warns about ("triggered
    tf.function retracing") from the fifth on: expected here, so not shown."""
    def keep(record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()

    logger = logging.getLogger("tensorflow")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _describe(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


def _errors(out: Path, number: int) -> Path:
    folder = out / "errors"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"trial-{number:03d}.txt"


def _finish(study, spec: SearchSpec, base: dict, out: Path, names: list[str],
            tracker) -> SearchResult:
    """Results, best.toml and the best configuration's final run (test evaluated once)."""
    from optuna.trial import TrialState

    rows = results.trial_rows(study, names)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        summary = "No trial finished: see the notes below and errors/."
        results.write_results(out, rows, names, summary)
        log.error("search: no trial finished; see %s", out / "results.md")
        bad = all("UserInputError" in row["note"] for row in rows if row["state"] == "fail")
        return SearchResult(out, spec, rows, None, None, None, bad_input=bad)
    best = study.best_trial
    config = config_lib.from_dict(base | best.params | (
        {"lr": best.user_attrs["lr_chosen"]} if "lr_chosen" in best.user_attrs else {}),
        "best trial")
    results.write_best_toml(out / "best.toml", config, best.number, best.value)
    run_folder = out / f"best-trial-{best.number:03d}"
    if (run_folder / "metrics.json").is_file():
        metrics = json.loads((run_folder / "metrics.json").read_text())
        log.info("search: the best configuration's run %s is finished; skipped", run_folder)
    else:
        log.info("search: best trial %d (val accuracy %.3f); training it once more in %s and "
                 "evaluating the test split there, once", best.number, best.value, run_folder)
        keras.backend.clear_session()
        metrics = pipeline.run(config.replace(out=str(run_folder))).metrics
    test = metrics.get("test_accuracy")
    summary = (f"Best: trial {best.number}, validation accuracy {100 * best.value:.1f}% "
               f"({_describe(best.params)}). Trials were compared on the validation split "
               f"only.\n\nTest accuracy of the best configuration, evaluated once after the "
               f"search (run folder {run_folder.name}/): "
               + ("n/a (no test images)" if test is None else f"{100 * test:.1f}%") +
               f".\n\nbest.toml reruns it: `tlapp train --config {out / 'best.toml'}`")
    results.write_results(out, rows, names, summary)
    if tracker:
        tracker.log_metrics({"best_val_accuracy": best.value, "best_trial": best.number}
                            | ({"best_test_accuracy": test} if test is not None else {}))
        tracker.log_files([out / "results.md", out / "results.csv", out / "best.toml",
                           out / "plots"])
    log.info("search: best trial %d, val accuracy %.3f, test accuracy %s; results in %s",
             best.number, best.value, "n/a" if test is None else f"{test:.3f}",
             out / "results.md")
    return SearchResult(out, spec, rows, next(r for r in rows if r["trial"] == best.number),
                        run_folder, test)
