"""MODEL_CARD.md: written from a run's files into the run folder and every export; its
numbers agree with split.json and metrics.json, its intervals are Wilson's, and hostile class
names cannot break its Markdown."""
import html
import json
import math
import re
import shutil

import pytest

from conftest import make_folder, run_cli
from tlapp.data import scan
from tlapp.reporting import model_card
from tlapp.reporting.model_card import CARD, escape, wilson_interval

Z = 1.959963984540054


def render(text: str) -> str:
    markdown_it = pytest.importorskip("markdown_it", reason="markdown-it-py (a rich dependency)")
    return markdown_it.MarkdownIt("commonmark").enable("table").render(text)


def tables(rendered: str) -> list[list[list[str]]]:
    """Every table of rendered HTML: rows of cell texts (header row first)."""
    return [[[html.unescape(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)]
             for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
            for table in re.findall(r"<table>(.*?)</table>", rendered, re.S)]


def table_with(rendered: str, header: list[str]) -> list[list[str]]:
    return next(t[1:] for t in tables(rendered) if t[0] == header)


def split_json_counts(folder) -> dict:
    """Images per class and split counted from split.json (CLASS/file paths)."""
    split = json.loads((folder / "split.json").read_text())
    counts = {}
    for name in ("train", "val", "test"):
        for path in split[name]:
            counts.setdefault(path.split("/")[0], {"train": 0, "val": 0, "test": 0})[name] += 1
    return counts


def card_counts(text: str) -> dict:
    rows = table_with(render(text), ["class", "train", "val", "test", "total"])
    assert rows[-1][0] == "all"
    return {r[0]: {"train": int(r[1]), "val": int(r[2]), "test": int(r[3])} for r in rows[:-1]}


def test_wilson_interval_equals_the_hand_computation():
    # 8 of 10: centre (8 + z^2/2) / (10 + z^2), half-width z / (10 + z^2) * sqrt(1.6 + z^2/4)
    centre, half = (8 + Z * Z / 2) / (10 + Z * Z), Z / (10 + Z * Z) * math.sqrt(1.6 + Z * Z / 4)
    assert wilson_interval(8, 10) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # published
    assert wilson_interval(0, 10) == (0.0, pytest.approx(Z * Z / (10 + Z * Z)))  # 0.2775
    assert wilson_interval(10, 10) == (pytest.approx(10 / (10 + Z * Z)), 1.0)  # 0.7225
    assert wilson_interval(1, 1) == (pytest.approx(1 / (1 + Z * Z)), 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(3, 7)
    assert (1 - high, 1 - low) == pytest.approx(wilson_interval(4, 7))  # symmetric
    assert model_card.card_sections.estimate(4, 4) == "4/4 = 100.0% (95% CI 51.0-100.0%)"


# (a label cannot hold "/" or a line break: the scan refuses them, labels.txt could not)
HOSTILE = ["a|b", "**bold**", "<script>alert(1)", "<img src=x onerror=alert(1)>", "`code`",
           "x & y", "- dash", "# hash", "back\\slash|", "[link](http:e.com)", "_u_ ~s~"]


def write_fake_run(folder, labels):
    """A run folder's files (no model): 2 train, 1 val, 1 test image per class."""
    folder.mkdir()
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    (folder / "config.toml").write_text('data = "/d/x"\nbackbone = "resnet50"\nweights = '
                                        '"imagenet"\nimage_size = 32\ncalibrate = "on"\n')
    split = {"train": [f"{n}/t{i}.png" for n in labels for i in range(2)],
             "val": [f"{n}/v.png" for n in labels], "test": [f"{n}/s.png" for n in labels],
             "skipped": [{"path": "bad|\nname <b>.jpg", "reason": "not an image"}]}
    (folder / "split.json").write_text(json.dumps(split))
    per_class = {n: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1} for n in labels}
    matrix = [[int(i == j) for j in range(len(labels))] for i in range(len(labels))]
    (folder / "metrics.json").write_text(json.dumps({
        "counts": {"found": 4 * len(labels) + 1, "used": 4 * len(labels), "skipped": 1},
        "test": {"accuracy": 1.0, "count": len(labels), "per_class": per_class,
                 "confusion_matrix": matrix},
        "calibration": {"method": "temperature scaling", "temperature": 1.5, "test": {
            "ece_before": 0.2, "ece_after": 0.05, "nll_before": 1, "nll_after": 0.5}}}))


def test_hostile_class_names_keep_the_markdown_valid(tmp_path):
    assert escape("two\nlines\u2028|") == "two lines \\|"
    folder = tmp_path / "run"
    write_fake_run(folder, HOSTILE)
    text = model_card.write_model_card(folder).read_text()
    rendered = render(text)
    assert "<script>" not in rendered and "<b>" not in rendered and "<a " not in rendered
    assert "<img" not in rendered
    assert "<strong>" not in rendered and "<code>" in rendered  # only the card's own `tlapp`
    assert [r[1] for r in table_with(rendered, ["index", "class"])] == HOSTILE
    per_class = table_with(rendered, ["class", "test images", "recall (found/images)",
                                      "precision"])
    assert [r[0] for r in per_class] == HOSTILE and all(len(r) == 4 for r in per_class)
    assert card_counts(text) == split_json_counts(folder)
    assert table_with(rendered, ["reason", "files", "for example"]) == [
        ["not an image", "1", "bad| name <b>.jpg"]]
    assert "0.2000 before, 0.0500 after" in text  # ECE on test


def test_scan_counts_record_conflicts_and_classes_per_split(tmp_path):
    root = make_folder(tmp_path / "data", per_class=6)
    shutil.copy(root / "cat" / "cat_00.png", root / "dog" / "copy_of_cat.png")
    counts = scan.scan_folder(root).counts()
    assert counts["conflicts"] == 1 and counts["duplicates"] == 1 and counts["leaks"] == 0
    assert {name: sum(v.values()) for name, v in counts["per_class_split"].items()} == \
        counts["per_class"]
    assert sum(v["test"] for v in counts["per_class_split"].values()) == counts["test"]


def test_card_of_a_trained_run_and_its_saved_model(trained_run):
    folder = trained_run.path
    text = (folder / CARD).read_text()
    assert (folder / "saved_model" / CARD).read_text().startswith(text.rstrip())
    assert "## This export" in (folder / "saved_model" / CARD).read_text()
    rendered = render(text)
    assert [r[1] for r in table_with(rendered, ["index", "class"])] == trained_run.labels
    assert card_counts(text) == split_json_counts(folder)
    test = trained_run.metrics["test"]
    k, n = sum(test["confusion_matrix"][i][i] for i in range(3)), test["count"]
    low, high = wilson_interval(k, n)
    assert f"- test accuracy: {k}/{n} = {100 * k / n:.1f}% (95% CI {100 * low:.1f}-" \
           f"{100 * high:.1f}%)" in text
    calibration = trained_run.metrics["calibration"]
    line = next(x for x in text.splitlines() if x.startswith("- Calibration:"))
    assert ("not calibrated" in line) == bool(calibration.get("skipped"))
    assert "No file was skipped." in text and "Label conflicts: none found" in text
    assert "fewer than 20 training images" in text  # the fixture's classes are tiny
    assert "There is no reject threshold" in text


def test_export_writes_the_card_of_an_old_run(trained_run, tmp_path, capsys):
    """A run made before cards (no MODEL_CARD.md, no per-split counts or conflicts in
    metrics.json) gets one from its files, in the run folder and in the export."""
    run = tmp_path / "run"
    shutil.copytree(trained_run.path, run, ignore=shutil.ignore_patterns(CARD))
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("per_class_split", "conflicts", "leaks"):
        del metrics["counts"][key]
    (run / "metrics.json").write_text(json.dumps(metrics))
    split = json.loads((run / "split.json").read_text())
    split["skipped"] = [{"path": f"cat/bad{i}.jpg", "reason": "not an image"} for i in range(4)] \
        + [{"path": "dog/e.png", "reason": "empty"}]
    (run / "split.json").write_text(json.dumps(split))
    code, out, err = run_cli(capsys, "export", run, "--out", tmp_path / "serving")
    assert code == 0, err
    text = (run / CARD).read_text()
    assert (tmp_path / "serving" / CARD).read_text().startswith(text.rstrip())
    assert card_counts(text) == split_json_counts(run)
    assert table_with(render(text), ["reason", "files", "for example"]) == [
        ["not an image", "4", "cat/bad0.jpg, cat/bad1.jpg, cat/bad2.jpg, ..."],
        ["empty", "1", "dog/e.png"]]
    assert "label conflicts were not recorded" in text


def test_evaluate_writes_the_run_card_and_its_saved_model_card_again(trained_run, tmp_path,
                                                                        capsys):
    """`tlapp evaluate RUN` adds a line for its result to MODEL_CARD.md (the run's and its
    SavedModel's); the training-time lines stay (before: the card did not change)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run.path, run)
    before = (run / CARD).read_text()
    code, _, err = run_cli(capsys, "evaluate", run, "--tta", "flip")
    assert code == 0, err
    result = json.loads((run / "metrics.json").read_text())["evaluate"]
    k, n = sum(result["confusion_matrix"][i][i] for i in range(3)), result["count"]
    low, high = wilson_interval(k, n)
    line = (f"- `tlapp evaluate` on the test split (test-time augmentation: flip): accuracy "
            f"{k}/{n} = {100 * k / n:.1f}% (95% CI {100 * low:.1f}-{100 * high:.1f}%)")
    text = (run / CARD).read_text()
    assert line in text and line not in before

    def dated(card):  # the "Written by tlapp ... on DATE" line aside
        return [x for x in card.splitlines() if not x.startswith("Written by tlapp")]

    assert dated(text.replace(line + "\n", "")) == dated(before)
    assert line in (run / "saved_model" / CARD).read_text()


def test_reject_threshold_and_imbalance_are_stated(tmp_path):
    folder = tmp_path / "run"
    write_fake_run(folder, ["big", "small"])
    split = json.loads((folder / "split.json").read_text())
    split["train"] += [f"big/more{i}.png" for i in range(40)]
    (folder / "split.json").write_text(json.dumps(split))
    (folder / "reject.json").write_text(json.dumps({"reject_below": 0.625, "chosen": "auto",
                                                    "keep": 0.95}))
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["reject"] = {"reject_below": 0.625, "chosen": "auto", "keep": 0.95,
                         "test": {"coverage": 0.5, "selective_accuracy": 1.0}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    text = model_card.model_card(folder)
    assert "below 0.625 (chosen on the validation split to keep 95% of its images)" in text
    assert "answers 50.0% of the images, 100.0% of them right" in text
    assert "the largest class has 11.0x the images of the smallest (imbalanced" in text


def test_multi_label_card_has_thresholds_and_exact_set_accuracy(tmp_path):
    folder = tmp_path / "run"
    write_fake_run(folder, ["a", "b"])
    with (folder / "config.toml").open("a") as f:
        f.write("multi_label = true\n")
    (folder / "thresholds.json").write_text(json.dumps({"labels": ["a", "b"],
                                                        "thresholds": [0.3, 0.7]}))
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["test"] = {"accuracy": 0.75, "count": 4, "per_label": {
        "a": {"precision": 1.0, "recall": 0.5, "support": 2, "threshold": 0.3},
        "b": {"precision": 0.5, "recall": 1.0, "support": 3, "threshold": 0.7}}}
    del metrics["calibration"]
    (folder / "metrics.json").write_text(json.dumps(metrics))
    text = model_card.model_card(folder)
    assert "- test exact label set right: " + model_card.card_sections.estimate(3, 4) in text
    rows = table_with(render(text), ["class", "test images", "recall (found/images)",
                                     "precision", "threshold"])
    assert [r[0] for r in rows] == ["a", "b"] and [r[-1] for r in rows] == ["0.300", "0.700"]
    assert rows[0][2] == model_card.card_sections.estimate(1, 2)
    assert "its own threshold" in text and "Calibration: not calibrated" in text


def test_ensemble_export_card_holds_every_member(tmp_path):
    runs = [tmp_path / "one", tmp_path / "two"]
    for run in runs:
        write_fake_run(run, ["a", "b"])
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "export.json").write_text(json.dumps({"tta": "flip"}))
    text = model_card.write_export_card(runs, tmp_path / "export").read_text()
    assert all((run / CARD).is_file() for run in runs)  # written for runs that had none
    assert text.startswith("# Model card: ensemble of 2 runs")
    assert "## Model card: one" in text and "## Model card: two" in text
    assert "### Metrics" in text and text.count("## This export") == 1
    assert table_with(render(text), ["setting", "value"]) == [["tta", "flip"]]
