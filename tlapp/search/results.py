"""A search's outputs: results.csv, results.md, plots/search.png and best.toml."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from tlapp import config as config_lib
from tlapp.files import write_text
from tlapp.reporting.plots import plot_search

COLUMNS = ["trial", "state", "val_accuracy", "epochs", "seconds", "note"]


def trial_rows(study, names: list[str]) -> list[dict]:
    """One row per trial, in order: number, state, the searched values, validation
    accuracy (a pruned trial's last report), epochs trained, seconds and a note."""
    from tlapp.search.study import interrupted

    stopped = set(interrupted(study))
    rows = []
    for trial in study.get_trials(deepcopy=False):
        state = trial.state.name.lower()
        value = trial.value if state == "complete" else (
            trial.intermediate_values[max(trial.intermediate_values)]
            if trial.intermediate_values else None)
        note = trial.user_attrs.get("error", "")
        if trial.number in stopped:
            state = "interrupted"
            note = "process died; parameters tried again" if trial.params else \
                "process died before drawing its values"
        elif "retry_of" in trial.user_attrs:
            note = f"retry of trial {trial.user_attrs['retry_of']}"
        rows.append({"trial": trial.number, "state": state,
                     **{name: trial.params.get(name) for name in names},
                     "val_accuracy": value, "epochs": trial.user_attrs.get("epochs"),
                     "seconds": trial.user_attrs.get("seconds"), "note": note})
    return rows


def write_results(out: Path, rows: list[dict], names: list[str], summary: str) -> None:
    """results.csv (every column), results.md (table and summary) and the plot."""
    fields = ["trial", "state", *names, *COLUMNS[2:]]
    text = io.StringIO()
    writer = csv.DictWriter(text, fields, restval="")
    writer.writeheader()
    writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])
    write_text(out / "results.csv", text.getvalue())
    write_text(out / "results.md", f"# Search results: {out.name}\n\n{summary}\n\n"
                                   f"{results_table(rows, names)}\n")
    plot_search(rows, out / "plots" / "search.png")


def results_table(rows: list[dict], names: list[str]) -> str:
    header = ["trial", "state", *names, "val acc", "epochs", "seconds", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["trial"]), row["state"], *(_value(row[n]) for n in names),
                 _percent(row["val_accuracy"]), _value(row["epochs"]),
                 "" if row["seconds"] is None else f"{row['seconds']:.1f}", row["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_best_toml(path: Path, config: config_lib.Config, trial: int, value: float) -> None:
    """The best configuration as a `tlapp train --config` file (without `out`, so it can
    be run again anywhere)."""
    text = config_lib.to_toml(config.replace(out=None))
    header = (f"# best configuration of the search in {path.parent} (trial {trial}, "
              f"validation accuracy {value:.4f}); run it with: tlapp train --config "
              f"{path.name} [--out RUN]\n")
    write_text(path, header + text.split("\n", 1)[1])


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _value(value) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)
