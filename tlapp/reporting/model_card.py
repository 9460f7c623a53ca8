"""MODEL_CARD.md: what a run's model classifies, how it was made, how well it does (with
95% intervals) and what tlapp knows it cannot do; written from the run folder's own files
(config.toml, labels.txt, split.json, metrics.json, reject.json, thresholds.json), never by
hand, into the run folder and beside every export of it.

Class and file names are user data: `escape` keeps the Markdown valid whatever they hold
(`|`, `*`, backticks, line breaks, HTML).
"""
from __future__ import annotations

import datetime
import logging
import tomllib
from pathlib import Path

from tlapp.constants import SPLITS
from tlapp.files import write_text
from tlapp.reporting import card_sections
from tlapp.reporting.card_sections import escape, read_json, table, wilson_interval  # noqa: F401

CARD = "MODEL_CARD.md"

log = logging.getLogger(__name__)


def read_config(folder: Path) -> dict:
    try:
        return tomllib.loads((folder / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def split_counts(folder: Path, labels: list[str], metrics: dict) -> dict[str, dict[str, int]]:
    """Images per class and split: metrics.json's counts.per_class_split, or for runs made
    before it was recorded, split.json's labels (or paths: CLASS/... or SPLIT/CLASS/...)."""
    recorded = (metrics.get("counts") or {}).get("per_class_split")
    if isinstance(recorded, dict) and recorded:
        return recorded
    split = read_json(folder / "split.json", {})
    counts = {name: dict.fromkeys(SPLITS, 0) for name in labels}
    known = set(labels)
    paths = [(name, p) for name in SPLITS for p in split.get(name) or []]
    presplit = any(p.split("/", 1)[0] not in known for _, p in paths)
    for name in SPLITS:
        given = (split.get("labels") or {}).get(name)
        for i, path in enumerate(split.get(name) or []):
            if given is not None and i < len(given):
                found = given[i] if isinstance(given[i], list) else [given[i]]
            else:
                parts = path.split("/")
                found = parts[1:2] if presplit else parts[:1]
            for label in found:
                if label in counts:
                    counts[label][name] += 1
    return counts


def write_model_card(folder: str | Path, name: str | None = None) -> Path:
    """Writes folder/MODEL_CARD.md from the run folder's files; returns its path."""
    folder = Path(folder)
    path = folder / CARD
    write_text(path, model_card(folder, name))
    return path


def write_cards_safely(folder: Path, name: str | None = None) -> None:
    """MODEL_CARD.md in a run folder and in its SavedModel (written again from the folder's
    files); a failure is reported, never raised: it must not cost a finished run or
    evaluation."""
    try:
        write_model_card(folder, name)
        if (folder / "saved_model").is_dir():
            write_export_card([folder], folder / "saved_model")
    except Exception as error:  # noqa: BLE001 - what the card tells is in the files
        log.warning("model card: MODEL_CARD.md was not written (%s: %s); 'tlapp report RUN' "
                    "writes it later", type(error).__name__, error)


def model_card(folder: str | Path, name: str | None = None) -> str:
    """The model card of a run folder, as Markdown."""
    folder = Path(folder)
    config = read_config(folder)
    metrics = read_json(folder / "metrics.json", {}) or {}
    try:
        labels = (folder / "labels.txt").read_text().splitlines()
    except OSError:
        labels = list(((metrics.get("counts") or {}).get("per_class") or {}))
    counts = split_counts(folder, labels, metrics)
    lines = [f"# Model card: {escape(name or folder.name)}", "",
             f"Written by tlapp from this run's files (config.toml, labels.txt, split.json, "
             f"metrics.json) on {datetime.date.today().isoformat()}; do not edit it by hand: "
             f"`tlapp report RUN` writes it again.", ""]
    for section in card_sections.SECTIONS:
        lines += section(folder, config, metrics, labels, counts) + [""]
    return "\n".join(lines).rstrip() + "\n"


def write_export_card(run_folders: list[str | Path], export: str | Path) -> Path:
    """MODEL_CARD.md in an export's folder (`export`: the folder, or the file in it): the
    run's card (written first into a run folder that has none, e.g. an old run), or for an
    ensemble a header and each member's card."""
    export = Path(export)
    target = export if export.is_dir() else export.parent
    runs = [Path(p) for p in run_folders]
    texts = []
    for run in runs:
        if not (run / CARD).is_file():
            write_model_card(run)
        texts.append((run / CARD).read_text())
    if len(runs) == 1:
        text = texts[0]
    else:
        text = "\n".join([f"# Model card: ensemble of {len(runs)} runs", "",
                          "The export averages the probabilities of these runs; each run's "
                          "card follows.", ""] + [
            "\n".join("#" + line if line.startswith("#") else line
                      for line in card.splitlines()) + "\n" for card in texts])
    text = text.rstrip() + "\n\n" + _export_section(target) + "\n"
    path = target / CARD
    write_text(path, text)
    return path


def _export_section(target: Path) -> str:
    description = read_json(target / "export.json") or read_json(
        target / "assets" / "export.json") or {}
    files = sorted(p.name for p in target.iterdir() if not p.name.startswith(".")
                   and p.name != CARD)
    rows = [[key, value] for key, value in description.items()
            if isinstance(value, (str, int, float, bool)) and value is not None]
    lines = ["## This export", "", f"Folder {escape(target.name)}: "
             + ", ".join(escape(f) for f in files) + "."]
    if rows:
        lines += ["", "From its export.json:", ""] + table(["setting", "value"], rows)
    return "\n".join(lines)
