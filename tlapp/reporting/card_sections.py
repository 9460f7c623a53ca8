"""The sections of MODEL_CARD.md (see model_card.py), and the Markdown and statistics they
need: `escape` keeps the Markdown valid whatever a class or file name holds (`|`, `*`,
backticks, line breaks, HTML); `wilson_interval` gives the 95% intervals.
"""
from __future__ import annotations

import html
import json
import math
import unicodedata
from pathlib import Path

from tlapp.constants import SPLITS
from tlapp.data.splits import MIN_CLASS_IMAGES

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
FEW_TRAIN_IMAGES = 20  # a class with fewer training images is named among the limitations
IMBALANCE_RATIO = 3.0  # largest class / smallest class at or above this: called imbalanced
SKIPPED_EXAMPLES = 3  # file names shown per skip reason (split.json lists every one)
MARKDOWN_SPECIAL = "\\`*_[]|~"  # inline Markdown; & < > become entities


def escape(value) -> str:
    """Inline Markdown text for `value`: line breaks become spaces, Markdown punctuation is
    backslash-escaped and &, <, > become HTML entities, so it renders as the literal text
    and never breaks a table row."""
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch
                   for ch in str(value))
    text = "".join("\\" + ch if ch in MARKDOWN_SPECIAL else ch for ch in text)
    return html.escape(text, quote=False)


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); (0, 1) without trials."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    # at k = 0 or k = n one end is exactly 0 or 1; rounding must not move it
    return (0.0 if successes == 0 else max(0.0, center - half),
            1.0 if successes == trials else min(1.0, center + half))


def estimate(successes: int, trials: int) -> str:
    """'k/n = 83.3% (95% CI 55.2-95.3%)'."""
    if trials <= 0:
        return "no images"
    low, high = wilson_interval(successes, trials)
    return (f"{successes}/{trials} = {100 * successes / trials:.1f}% "
            f"(95% CI {100 * low:.1f}-{100 * high:.1f}%)")


def table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table; cells are escaped here, so pass plain values."""
    lines = ["| " + " | ".join(escape(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def classes_section(folder, config, metrics, labels, counts) -> list[str]:
    kind = "labels (several per image)" if config.get("multi_label") else "classes"
    return ["## What it classifies", "",
            f"{len(labels)} {kind}, in class-index order (labels.txt):", ""] + \
        table(["index", "class"], list(enumerate(labels)))


def _weights_text(weights: str) -> str:
    if weights == "none":
        return "none: random initialisation, no pretrained features"
    if weights in ("imagenet", "saved"):
        return weights
    return f"a weights file ({Path(weights).name})"


def model_section(folder, config, metrics, labels, counts) -> list[str]:
    blocks = config.get("trainable_blocks")
    rows = [["backbone", config.get("backbone", "unknown")],
            ["weights", _weights_text(str(config.get("weights", "unknown")))],
            ["image size", f"{config.get('image_size', '?')} px"],
            ["frozen stem ends at (cut)", config.get("cut") or "the backbone's default"],
            ["trained in stage 1", "every layer (trainable_blocks = all)" if blocks == "all"
             else "the new head and the backbone's layers after the cut, if any"
             + (f" (trainable_blocks = {blocks})" if blocks is not None else "")],
            ["stage 1 (head)", f"{config.get('epochs', '?')} epochs, lr {config.get('lr', '?')},"
                               f" {config.get('optimizer', '?')}"],
            ["stage 2 (fine-tuning)",
             f"{config['fine_tune_epochs']} epochs, unfreezing "
             + (f"everything above {config['fine_tune_cut']}" if config.get("fine_tune_cut")
                else f"{config.get('fine_tune_blocks', 1)} more block(s)")
             if config.get("fine_tune_epochs") else "none"],
            ["augmentation", config.get("augment") or "none"],
            ["class weights", config.get("class_weight", "none")]]
    entry = (metrics.get("cache") or {}).get("entry")
    if entry:
        rows.append(["feature cache entry", entry])
    return ["## Model", ""] + table(["", ""], rows) + [
        "", "The whole model takes image pixels and returns probabilities; the backbone's "
            "preprocessing is inside it. config.toml holds every setting (rerun it with "
            "`tlapp train --config config.toml`)."]


def data_section(folder, config, metrics, labels, counts) -> list[str]:
    totals = metrics.get("counts") or {}
    data = str(config.get("data", ""))
    source = data if data.startswith("tfds:") else Path(data).name or data
    rows = [[label] + [counts.get(label, {}).get(s, 0) for s in SPLITS]
            + [sum(counts.get(label, {}).get(s, 0) for s in SPLITS)] for label in labels]
    rows.append(["all"] + [sum(r[1 + i] for r in rows) for i in range(len(SPLITS))]
                + [sum(r[-1] for r in rows)])
    lines = ["## Training data", "",
             f"Data: {escape(source) or 'unknown'}. Files found {totals.get('found', '?')}, used "
             f"{totals.get('used', '?')}, skipped {totals.get('skipped', '?')}, ignored (hidden, "
             f"system and non-image files) {totals.get('ignored', '?')}. Split by content hash: "
             f"val {config.get('val_fraction', '?')}, test {config.get('test_fraction', '?')} "
             f"of each class unless train/val/test folders were given. Images per class and "
             f"split" + (" (an image counts for each of its labels)" if config.get("multi_label")
                         else "") + ":", ""]
    lines += table(["class", *SPLITS, "total"], rows) + [""]
    skipped = read_json(folder / "split.json", {}).get("skipped") or []
    if not skipped:
        return lines + ["No file was skipped."]
    number: dict[str, int] = {}
    examples: dict[str, list[str]] = {}  # a few per reason: split.json holds them all
    for item in skipped:
        reason = str(item.get("reason", "unknown"))
        number[reason] = number.get(reason, 0) + 1
        if len(shown := examples.setdefault(reason, [])) < SKIPPED_EXAMPLES:
            shown.append(str(item.get("path", "")))
    lines += [f"{len(skipped)} file(s) skipped, by reason (split.json lists every one with "
              f"its detail):", ""]
    return lines + table(["reason", "files", "for example"], [
        [reason, n, ", ".join(examples[reason]) + (", ..." if n > SKIPPED_EXAMPLES else "")]
        for reason, n in sorted(number.items(), key=lambda kv: (-kv[1], kv[0]))])


def correct_count(result: dict) -> int | None:
    """Correctly classified images of an evaluation block: the confusion matrix's trace,
    else accuracy x count rounded."""
    matrix = result.get("confusion_matrix")
    if matrix:
        return int(sum(matrix[i][i] for i in range(len(matrix))))
    if result.get("accuracy") is None or not result.get("count"):
        return None
    return int(round(result["accuracy"] * result["count"]))


def metrics_section(folder, config, metrics, labels, counts) -> list[str]:
    lines = ["## Metrics", ""]
    multi = bool(config.get("multi_label"))
    what = "exact label set right" if multi else "accuracy"
    for name in ("test", "val"):
        result = metrics.get(name) or {}
        k, n = correct_count(result), int(result.get("count") or 0)
        lines.append(f"- {name} {what}: " + (estimate(k, n) if n and k is not None
                                                else "no images, so no estimate"))
    later = metrics.get("evaluate")
    if later:  # `tlapp evaluate RUN` since: its data, test-time augmentation and result
        k, n = correct_count(later), int(later.get("count") or 0)
        data = later.get("data") or "test split"  # or the folder or list it was given
        lines.append(f"- `tlapp evaluate` on "
                     f"{'the test split' if data == 'test split' else escape(data)} "
                     f"(test-time augmentation: {escape(later.get('tta') or 'none')}): {what} "
                     + (estimate(k, n) if n and k is not None else "no estimate"))
    lines += ["", "Intervals are 95% Wilson score intervals from the number of images: with "
                  "few test images they are wide, and the true accuracy on new images like "
                  "these may be anywhere inside.", ""]
    test = metrics.get("test") or {}
    per_class = test.get("per_label" if multi else "per_class") or {}
    if not per_class:
        return lines + ["No per-class test results (no test images)."]
    rows = []
    for label in labels:
        item = per_class.get(label) or {}
        support = int(item.get("support") or 0)
        recall = item.get("recall")
        found = int(round(recall * support)) if recall is not None else None
        rows.append([label, support, "-" if found is None or not support
                     else estimate(found, support),
                     "-" if item.get("precision") is None else f"{item['precision']:.3f}"]
                    + ([f"{item['threshold']:.3f}"] if multi and "threshold" in item else []))
    header = ["class", "test images", "recall (found/images)", "precision"] + (
        ["threshold"] if multi else [])
    return lines + ["Per class on the test split:", ""] + table(header, rows)


def use_section(folder, config, metrics, labels, counts) -> list[str]:
    names = ", ".join(escape(label) for label in labels)
    lines = ["## Intended use", "",
             f"Classifying images like the training data into these {len(labels)} "
             f"{'labels' if config.get('multi_label') else 'classes'}: {names}. "
             f"It is not meant for other kinds of images or other classes, and it has not "
             f"been evaluated on them.", ""]
    reject = read_json(folder / "reject.json") or metrics.get("reject")
    thresholds = read_json(folder / "thresholds.json")
    if thresholds:
        return lines + ["Each label is predicted when its probability reaches its own "
                        "threshold, tuned on the validation split (thresholds.json, and the "
                        "table above)."]
    if reject and reject.get("reject_below") is not None:
        below = float(reject["reject_below"])
        how = f"chosen on the validation split to keep {100 * float(reject.get('keep', 0)):.0f}% " \
              f"of its images" if reject.get("chosen") == "auto" else "given"
        test = (metrics.get("reject") or {}).get("test") or {}
        answered = (f" On the test split it answers {100 * test['coverage']:.1f}% of the "
                    f"images" + (f", {100 * test['selective_accuracy']:.1f}% of them right."
                                 if test.get("selective_accuracy") is not None else ".")
                    if test.get("coverage") is not None else "")
        return lines + [f"Reject threshold: an image whose top probability is below "
                        f"{below:.3f} ({how}) is answered \"unknown\" (reject.json).{answered}"]
    return lines + ["There is no reject threshold: every image gets one of the classes, "
                    "even an image of none of them (train with `--reject-below auto` to "
                    "answer \"unknown\" when unsure)."]


def limitations_section(folder, config, metrics, labels, counts) -> list[str]:
    totals = metrics.get("counts") or {}
    items = []
    few = [(label, counts.get(label, {}).get("train", 0)) for label in labels
           if counts.get(label, {}).get("train", 0) < FEW_TRAIN_IMAGES]
    if few:
        items.append(f"Classes with fewer than {FEW_TRAIN_IMAGES} training images (the model "
                     f"saw little of them; their results are uncertain): "
                     + ", ".join(f"{escape(label)} ({n})" for label, n in few) + ".")
    thin = [label for label in labels if sum(counts.get(label, {}).values()) < MIN_CLASS_IMAGES]
    if thin:
        items.append(f"Classes with fewer than {MIN_CLASS_IMAGES} images cannot appear in "
                     f"train, val and test: " + ", ".join(map(escape, thin)) + ".")
    untested = [label for label in labels if not counts.get(label, {}).get("test", 0)]
    if untested and labels:
        items.append("Classes with no test image (their recall is not measured): "
                     + ", ".join(map(escape, untested)) + ".")
    sizes = [sum(counts.get(label, {}).values()) for label in labels]
    if sizes and min(sizes) > 0:
        ratio = max(sizes) / min(sizes)
        items.append(f"Class imbalance: the largest class has {ratio:.1f}x the images of the "
                     f"smallest" + (f" (imbalanced: {IMBALANCE_RATIO:g}x or more; class "
                                    f"weights: {config.get('class_weight', 'none')})"
                                    if ratio >= IMBALANCE_RATIO else "") + ".")
    items += scan_findings(totals)
    items.append(_calibration_text(metrics, config))
    if str(config.get("weights")) == "none":
        items.append("The backbone was not pretrained (weights = none): its features are "
                     "random, so accuracy is far below what pretrained weights give.")
    return ["## Limitations tlapp knows", ""] + [f"- {item}" for item in items]


def scan_findings(totals: dict) -> list[str]:
    """Duplicates, label conflicts and split leaks the scan found (metrics.json's counts):
    sentences for the card and report.html."""
    if "conflicts" not in totals:
        return [f"Duplicates: {totals.get('duplicates', 0)} used file(s) repeat the content of "
                f"another; label conflicts were not recorded by the tlapp that made this run."]
    items = [f"Duplicates: {totals.get('duplicates', 0)} used file(s) repeat the content of "
             f"another (each kept in the split of its copies)."]
    if totals["conflicts"]:
        items.append(f"Label conflicts: {totals['conflicts']} image content(s) appear under "
                     f"more than one class, so their labels disagree.")
    else:
        items.append("Label conflicts: none found (no image content appears under two classes).")
    if totals.get("leaks"):
        items.append(f"Split overlap: {totals['leaks']} image content(s) appear in more than "
                     f"one split, so val/test results may be optimistic.")
    return items


def _calibration_text(metrics: dict, config: dict) -> str:
    if config.get("multi_label"):
        return "Calibration: not calibrated (multi-label probabilities are used as they are)."
    report = metrics.get("calibration")
    if not report:
        return "Calibration: not calibrated (the run predates calibration)."
    if report.get("skipped"):
        return f"Calibration: not calibrated ({report['skipped']}); probabilities may be " \
               f"over- or under-confident."
    name = "test" if "test" in report else "val"
    split = report.get(name) or {}
    ece = (f"; expected calibration error on {name} {split['ece_before']:.4f} before, "
           f"{split['ece_after']:.4f} after" if "ece_before" in split else "")
    return (f"Calibration: {report.get('method', 'temperature scaling')}, temperature "
            f"{report.get('temperature', 1.0):.3f} fitted on val{ece}.")


SECTIONS = (classes_section, model_section, data_section, metrics_section, use_section,
            limitations_section)
