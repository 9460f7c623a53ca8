"""RUN/report.html: one page for a finished run, opened from disk with no server and no
network: the data, the configuration, training curves, per-class metrics, the confusion
matrix, calibration and coverage, and the test images the model got most confidently
wrong with their Grad-CAM overlays.

Every class and file name is user data: it is escaped (`html.escape`) wherever it appears,
and the run report holds no script at all. Images are files beside the page: the run's
plots, and small JPEG thumbnails in RUN/report_files/.
"""
from __future__ import annotations

import csv
import html
import json
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from tlapp.data.scan import data_root, resolve_data
from tlapp.files import write_text
from tlapp.reporting.card_sections import scan_findings

log = logging.getLogger(__name__)

GALLERY = 12  # most confidently wrong test images shown
THUMB = 160  # pixels, the longer side of a gallery thumbnail
FILES = "report_files"
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;
max-width:1100px;padding:12px;color:#222;line-height:1.4}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;border-bottom:1px solid #ddd;
margin-top:1.6em}table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.wrap{overflow-x:auto}
img.plot{max-width:100%;height:auto}pre{background:#f6f6f6;padding:8px;overflow-x:auto;
font-size:.85em}.gallery{display:grid;grid-template-columns:repeat(auto-fill,
minmax(170px,1fr));gap:10px}.card{border:1px solid #ddd;padding:6px;font-size:.8em;
overflow-wrap:anywhere}.card img{width:100%;height:auto}.muted{color:#666}
"""


def e(value) -> str:
    """Text for HTML: escaped, quotes included."""
    return html.escape(str(value), quote=True)


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="wrap"><table><tr>{head}</tr>{body}</table></div>'


def number(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) \
        else str(value)


def plot(folder: Path, name: str, alt: str, width: int = 900) -> str:
    path = folder / "plots" / name
    return (f'<img class="plot" style="width:{width}px" src="plots/{e(name)}" alt="{e(alt)}">'
            if path.is_file() else "")


def write_report(folder: str | Path, model=None, metrics: dict | None = None,
                 name: str | None = None) -> Path:
    """Writes folder/report.html (and folder/report_files/) for a run folder; `model` (the
    run's whole model) adds Grad-CAM overlays to the gallery; `name`: the run's (default the
    folder's)."""
    folder = Path(folder)
    metrics = metrics if metrics is not None else json.loads((folder / "metrics.json").read_text())
    config_text = (folder / "config.toml").read_text()
    labels = (folder / "labels.txt").read_text().splitlines()
    files = folder / FILES
    shutil.rmtree(files, ignore_errors=True)
    files.mkdir()
    sections = [_data_section(metrics, folder), _training_section(folder),
                _metrics_section(metrics, labels, folder), _decisions_section(metrics, folder),
                _gallery_section(folder, files, model, labels),
                f"<h2>Configuration</h2><pre>{e(config_text)}</pre>"]
    accuracy = metrics.get("test_accuracy")
    title = f"tlapp run {name or folder.name}"
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{e(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{e(title)}</h1><p class=\"muted\">{len(labels)} classes; test accuracy "
            f"{e(number(accuracy))}; validation accuracy "
            f"{e(number(metrics.get('val_accuracy')))}</p>"
            + "".join(sections) + "</body></html>\n")
    path = folder / "report.html"
    write_text(path, page)
    return path


SKIPPED_SHOWN = 50  # skipped files listed by name (all are in split.json)


def _skipped_files(folder: Path) -> str:
    try:
        skipped = json.loads((folder / "split.json").read_text()).get("skipped", [])
    except (OSError, ValueError):
        return ""
    if not skipped:
        return ""
    rows = [[item.get("path", ""), item.get("reason", ""), item.get("detail", "")]
            for item in skipped[:SKIPPED_SHOWN]]
    more = f"<p class=\"muted\">... and {len(skipped) - SKIPPED_SHOWN} more.</p>" \
        if len(skipped) > SKIPPED_SHOWN else ""
    return table(["skipped file", "reason", "detail"], rows) + more


def _data_section(metrics: dict, folder: Path) -> str:
    counts = metrics.get("counts", {})
    per_class = counts.get("per_class", {})
    rows = [[name, n] for name, n in per_class.items()]
    summary = (f"<p>Used {e(counts.get('used', '?'))} of {e(counts.get('found', '?'))} files: "
               f"train {e(counts.get('train', '?'))}, val {e(counts.get('val', '?'))}, test "
               f"{e(counts.get('test', '?'))}.</p><ul>"
               + "".join(f"<li>{e(finding)}</li>" for finding in scan_findings(counts))
               + "</ul>")
    skipped = counts.get("skipped_by_reason") or {}
    skipped_html = table(["skipped because", "files"], [[k, v] for k, v in skipped.items()]) \
        if skipped else "<p>No file was skipped.</p>"
    return (f"<h2>Data</h2>{summary}{table(['class', 'images'], rows)}{skipped_html}"
            f"{_skipped_files(folder)}"
            f'<p class="muted">Every skipped file is listed with its reason in split.json.</p>')


def _training_section(folder: Path) -> str:
    return f"<h2>Training</h2>{plot(folder, 'training_curves.png', 'training curves')}"


def _metrics_section(metrics: dict, labels: list[str], folder: Path) -> str:
    test = metrics.get("test") or {}
    if "per_class" in test:
        rows = [[name, number(c["precision"]), number(c["recall"]), number(c["f1"]),
                 c["support"]] for name, c in test["per_class"].items()]
        body = table(["class", "precision", "recall", "F1", "support"], rows)
        matrix = test.get("confusion_matrix")
        if matrix:
            body += "<h3>Confusion matrix (rows: true, columns: predicted)</h3>" + table(
                ["true \\ predicted", *labels], [[name, *row] for name, row in
                                                 zip(labels, matrix)])
            body += plot(folder, "confusion_matrix.png", "confusion matrix", 420)
    elif "per_label" in test:
        rows = [[name, number(c["precision"]), number(c["recall"]), number(c["f1"]),
                 number(c["average_precision"]), number(c["threshold"]), c["support"]]
                for name, c in test["per_label"].items()]
        body = table(["label", "precision", "recall", "F1", "AP", "threshold", "support"],
                     rows)
    else:
        body = "<p>The test split has no images.</p>"
    return f"<h2>Test split</h2>{body}"


def _decisions_section(metrics: dict, folder: Path) -> str:
    block = metrics.get("calibration")
    if not block:
        return ""
    parts = [f"<h2>Calibration and rejection</h2><p>Temperature "
             f"{e(number(block.get('temperature')))}"
             + (f" ({e(block['skipped'])})" if "skipped" in block else "") + ".</p>"]
    rows = [[name, number(block[name]["nll_before"], 4), number(block[name]["nll_after"], 4),
             number(block[name]["ece_before"], 4), number(block[name]["ece_after"], 4)]
            for name in ("val", "test") if name in block]
    if rows:
        parts.append(table(["split", "NLL before", "NLL after", "ECE before", "ECE after"],
                           rows))
    parts.append(plot(folder, "reliability.png", "reliability diagram"))
    reject = metrics.get("reject")
    if reject:
        parts.append(f"<p>Answers 'unknown' below {e(number(reject['reject_below']))} "
                     f"({e(reject['chosen'])}).</p>")
    parts.append(plot(folder, "coverage.png", "accuracy against coverage", 420))
    return "".join(parts)


def _gallery_section(folder: Path, files: Path, model, labels: list[str]) -> str:
    wrong = folder / "misclassified.csv"
    if not wrong.is_file():
        return ""
    with open(wrong, newline="") as f:
        rows = list(csv.DictReader(f))[:GALLERY]
    if not rows:
        return "<h2>Most confident mistakes</h2><p>No test image was misclassified.</p>"
    root = _data_root(folder)
    paths = [Path(row["file"]) if root is None else root / row["file"] for row in rows]
    predicted = [labels.index(row["predicted"]) if row["predicted"] in labels else None
                 for row in rows]
    overlays = _grad_cams(model, paths, predicted)
    cards = []
    for i, (row, path) in enumerate(zip(rows, paths)):
        images = _thumbnails(path, files, i, overlays.get(i))
        pictures = "".join(f'<img src="{FILES}/{e(name)}" alt="{e(alt)}">'
                           for name, alt in images) or '<p class="muted">(image not found)</p>'
        cards.append(f'<div class="card">{pictures}<div>{e(row["file"])}</div><div>true '
                     f'<b>{e(row["true"])}</b>, predicted <b>{e(row["predicted"])}</b> '
                     f'{e(number(float(row["confidence"])))}</div></div>')
    note = ("Each with its Grad-CAM overlay for the predicted class: where the model looked."
            if overlays or model is not None else "Grad-CAM overlays: 'tlapp report RUN' "
            "draws them (this run was written with gradcam = \"off\").")
    return (f"<h2>Most confident mistakes (test split)</h2><p class=\"muted\">{note}</p>"
            f'<div class="gallery">{"".join(cards)}</div>')


def _data_root(folder: Path) -> Path | None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        config = tomllib.loads((folder / "config.toml").read_text())
        return data_root(resolve_data(config["data"], Path(config.get("cache_dir") or ".")))
    except Exception:  # an unreadable config only costs the gallery its pictures
        return None


def _grad_cams(model, paths: list[Path], predicted: list[int | None]) -> dict[int, dict]:
    """Grad-CAM of the predicted class for each row that has one, in one call (batched):
    row index -> explain_files' result."""
    chosen = [i for i, p in enumerate(predicted) if p is not None and paths[i].is_file()]
    if model is None or not chosen:
        return {}
    try:
        from tlapp.inference.explain import explain_files

        size = int(model.input.shape[1])
        results = explain_files(model, [str(paths[i]) for i in chosen], size,
                                [predicted[i] for i in chosen])
    except Exception as error:  # the gallery keeps the images; the overlays are a bonus
        log.warning("report: no Grad-CAM overlays (%s)", error)
        return {}
    return dict(zip(chosen, results))


def _thumbnails(path: Path, files: Path, i: int, result: dict | None
                ) -> list[tuple[str, str]]:
    """The image and its Grad-CAM overlay (`result` of explain_files) as small JPEGs in
    `files`."""
    try:
        with Image.open(path) as image:
            picture = image.convert("RGB")
    except (OSError, ValueError):
        return []
    picture.thumbnail((THUMB, THUMB))
    written = [(f"{i:02d}.jpg", "image")]
    picture.save(files / written[0][0], quality=85)
    if result is not None and "heatmap" in result:
        overlay = _overlay(result["pixels"], result["heatmap"])
        overlay.thumbnail((THUMB, THUMB))
        written.append((f"{i:02d}-gradcam.jpg", "Grad-CAM overlay"))
        overlay.save(files / written[1][0], quality=85)
    return written


def _overlay(pixels: np.ndarray, heatmap: np.ndarray) -> Image.Image:
    """The heatmap (jet colours) blended over the image."""
    from matplotlib import colormaps

    colours = colormaps["jet"](heatmap)[..., :3] * 255
    return Image.fromarray((0.55 * pixels + 0.45 * colours).clip(0, 255).astype(np.uint8))


# Sorting by a column: a fixed script that reads cell text and data-value attributes only;
# no user text is ever part of a script.
SORT_SCRIPT = """
document.querySelectorAll("th[data-column]").forEach(function (th) {
  th.style.cursor = "pointer";
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
    var column = Number(th.dataset.column), down = th.dataset.order !== "down";
    th.dataset.order = down ? "down" : "up";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[column].dataset.value, y = b.cells[column].dataset.value;
      var nx = parseFloat(x), ny = parseFloat(y), c;
      if (!isNaN(nx) && !isNaN(ny)) { c = nx - ny; } else { c = String(x).localeCompare(y); }
      return down ? -c : c;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def write_experiment_report(out: Path, header: list[str], rows: list[list],
                            runs: list[str]) -> Path:
    """OUT/report.html of an experiment: the results table (click a column to sort) and the
    results plot; each run's name links to its own report."""
    out = Path(out)
    head = "".join(f'<th data-column="{i}">{e(h)}</th>' for i, h in enumerate(header))
    body = []
    for run, row in zip(runs, rows):
        cells = []
        for i, value in enumerate(row):
            text = e(value)
            if i == 0 and (out / run / "report.html").is_file():
                text = f'<a href="{e(run)}/report.html">{text}</a>'
            cells.append(f'<td data-value="{e(value)}">{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    results_plot = '<img class="plot" src="plots/results.png" alt="results">' \
        if (out / "plots" / "results.png").is_file() else ""
    title = f"tlapp experiment {out.name}"
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{e(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{e(title)}</h1><p class=\"muted\">Click a column to sort by it.</p>"
            f'<div class="wrap"><table><thead><tr>{head}</tr></thead><tbody>'
            f'{"".join(body)}</tbody></table></div>{results_plot}'
            f"<script>{SORT_SCRIPT}</script></body></html>\n")
    path = out / "report.html"
    write_text(path, page)
    return path
