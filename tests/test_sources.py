"""Datasets as practitioners have them: CSV and JSON Lines lists, labels from file names,
group-aware splits."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import CLASS_HUES, make_folder, run_cli, write_image
from tlapp.data.scan import expand_inputs, scan_folder
from tlapp.errors import UserInputError


def write_csv(path: Path, rows: list[list], header=("path", "label")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def listed(tmp_path):
    """Images under data/ (some outside it, named by absolute path) and a labels.csv with
    every case the scan must handle."""
    data = make_folder(tmp_path / "data" / "images", per_class=6)
    rng = np.random.default_rng(1)
    comma = write_image(tmp_path / "data" / "images" / "a, b.png", CLASS_HUES["dog"], rng)
    outside = write_image(tmp_path / "elsewhere" / "far.png", CLASS_HUES["cat"], rng)
    rows = [[f"images/{name}/{name}_{i:02d}{'.jpg' if i % 2 else '.png'}", name, ""]
            for name in CLASS_HUES for i in range(6)]
    rows[0][2] = "test"  # a given split is kept
    rows[1][2] = "val"
    rows += [[str(outside), "cat", ""],                      # line 20: absolute path
             [f"images/{comma.name}", "dog", ""],            # line 21: quoted comma
             ["images/cat/missing.jpg", "cat", ""],          # line 22: missing file
             [rows[3][0], "cat", ""],                        # line 23: duplicate row
             ["images/dog/dog_00.png", "", ""]]              # line 24: empty label
    # the last one names a file already listed: the empty label is reported first
    return write_csv(tmp_path / "data" / "labels.csv", rows, ("path", "label", "split")), data


def test_csv_list_is_scanned_with_every_row_used_or_listed(listed):
    listing, _ = listed
    scanned = scan_folder(listing)
    assert scanned.root == listing.parent and scanned.classes == ["cat", "dog", "fox"]
    paths = {s.path: s for s in scanned.samples}
    assert len(paths) == 18 + 2
    outside = next(p for p in paths if p.startswith("/"))
    assert Path(outside).name == "far.png" and scanned.classes[paths[outside].label] == "cat"
    assert scanned.classes[paths["images/a, b.png"].label] == "dog"
    assert paths["images/cat/cat_00.png"].split == "test"
    assert paths["images/cat/cat_01.jpg"].split == "val"
    skipped = {item["line"]: item for item in scanned.skipped}
    assert skipped[22]["reason"] == "unreadable" and skipped[22]["path"].endswith("missing.jpg")
    assert skipped[23]["reason"] == "duplicate row" and "line 5" in skipped[23]["detail"]
    assert skipped[24]["reason"] == "no label"
    assert len(scanned.skipped) == 3
    counts = scanned.counts()
    assert counts["found"] == 23 and counts["used"] == 20
    split = scanned.split_json()
    assert split["labels"]["test"][split["test"].index("images/cat/cat_00.png")] == "cat"


def test_jsonl_list_with_label_lists_and_groups(tmp_path):
    make_folder(tmp_path / "images", per_class=4)
    lines = [json.dumps({"path": f"images/{name}/{name}_{i:02d}{'.jpg' if i % 2 else '.png'}",
                         "label": name, "group": f"{name}-{i // 2}"})
             for name in CLASS_HUES for i in range(4)]
    lines.insert(3, "")  # blank lines are allowed
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    scanned = scan_folder(tmp_path / "list.jsonl", val_fraction=0.3, test_fraction=0.3)
    assert len(scanned.samples) == 12 and scanned.groups is not None
    assert sum(scanned.groups.values()) == 6
    by_group = {}
    for s in scanned.samples:
        name = s.path.split("/")[-1]
        by_group.setdefault((name.split("_")[0], int(name[-6:-4]) // 2), set()).add(s.split)
    assert all(len(splits) == 1 for splits in by_group.values())

    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(UserInputError, match=r"bad.jsonl, line 2: not valid JSON"):
        scan_folder(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("case, message", [
    ("no_header", "line 1: no column 'path'"),
    ("unknown_column", "line 1: no column 'species'"),
    ("mixed_delimiter", "line 3: 1 field(s) where the header has 2"),
    ("bad_split", "line 2: split must be one of train, val, test"),
    ("one_label", "gives 1 label(s)"),
    ("bad_regex", "--label-from is not a valid regular expression"),
    ("no_group", "--group-by needs a capture group"),
])
def test_malformed_lists_exit_2_naming_the_line(tmp_path, capsys, case, message):
    make_folder(tmp_path / "images", per_class=2)
    good = [["images/cat/cat_00.png", "cat"], ["images/dog/dog_00.png", "dog"]]
    listing = tmp_path / "labels.csv"
    extra = []
    if case == "no_header":
        write_csv(listing, good, header=None)
    elif case == "mixed_delimiter":
        listing.write_text("path,label\nimages/cat/cat_00.png,cat\nimages/dog/dog_00.png;dog\n")
    elif case == "bad_split":
        write_csv(listing, [good[0] + ["validation"]], ("path", "label", "split"))
    elif case == "one_label":
        write_csv(listing, [good[0]])
    else:
        write_csv(listing, good)
        extra = {"unknown_column": ["--label-column", "species"],
                 "bad_regex": ["--label-from", "(["],
                 "no_group": ["--group-by", "cat"]}[case]
        if case == "bad_regex":
            listing = tmp_path / "images"
    code, out, err = run_cli(capsys, "train", listing, "--backbone", "lenet5", "--epochs", 1,
                             "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run",
                             *extra)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def pets(root: Path) -> Path:
    """Oxford-IIIT Pets style: the breed is in the file name, all in one folder."""
    rng = np.random.default_rng(2)
    for breed, hue in (("Abyssinian", 0.0), ("beagle", 0.33), ("great_pyrenees", 0.6)):
        for i in range(1, 7):
            write_image(root / "images" / f"{breed}_{i}.jpg", hue, rng)
    write_image(root / "images" / "README.jpg", 0.1, rng)  # does not match: no label
    (root / "images" / "notes.txt").write_text("not an image\n")
    return root


def test_labels_from_file_names(tmp_path):
    data = pets(tmp_path / "pets")
    scanned = scan_folder(data, label_from=r"([^/]+)_\d+\.jpg$")
    assert scanned.classes == ["Abyssinian", "beagle", "great_pyrenees"]
    assert len(scanned.samples) == 18
    for s in scanned.samples:
        assert s.path.split("/")[-1].startswith(scanned.classes[s.label] + "_")
    assert [(i["path"], i["reason"]) for i in scanned.skipped] == [("images/README.jpg",
                                                                    "no label")]
    assert scanned.ignored == ["images/notes.txt"]
    assert scanned.counts()["found"] == 20


def grouped(root: Path, groups: int = 8, per_group: int = 4) -> Path:
    """Speech-commands style names (GROUP_nohash_N): per class, groups of near-copies."""
    rng = np.random.default_rng(3)
    for name in ("cat", "dog"):
        for g in range(groups):
            for i in range(per_group):
                write_image(root / name / f"{name}{g:02d}_nohash_{i}.png",
                            CLASS_HUES[name] + 0.01 * g, rng)
    return root


def _splits_of_groups(scanned) -> dict[str, set]:
    found = {}
    for s in scanned.samples:
        found.setdefault(s.path.split("/")[-1].split("_nohash_")[0], set()).add(s.split)
    return found


def test_group_by_keeps_every_group_in_one_split(tmp_path):
    data = grouped(tmp_path / "grouped")
    naive = scan_folder(data, 0.25, 0.25)
    assert any(len(splits) > 1 for splits in _splits_of_groups(naive).values()), \
        "the fixture must be one a content-hash split leaks"
    scanned = scan_folder(data, 0.25, 0.25, group_by=r"^[^/]+/(.+?)_nohash_")
    found = _splits_of_groups(scanned)
    assert len(found) == 16 and all(len(splits) == 1 for splits in found.values())
    assert sum(scanned.groups.values()) == 16
    assert scanned.counts()["groups"] == scanned.groups
    assert scanned.options["group_by"] == r"^[^/]+/(.+?)_nohash_"
    # stable as images are added: a new group moves no old one
    write_image(data / "cat" / "cat99_nohash_0.png", 0.0, np.random.default_rng(4))
    again = _splits_of_groups(scan_folder(data, 0.25, 0.25, group_by=r"^[^/]+/(.+?)_nohash_"))
    assert all(again[g] == found[g] for g in found)


def test_too_few_groups_to_reach_val_and_test_is_warned(tmp_path):
    data = grouped(tmp_path / "grouped", groups=1, per_group=5)
    scanned = scan_folder(data, 0.2, 0.2, group_by=r"^[^/]+/(.+?)_nohash_")
    assert any("too few groups" in w for w in scanned.warnings)


def test_predict_inputs_expand_a_list_file(listed):
    listing, _ = listed
    files = expand_inputs([str(listing)])
    assert len(files) == 23 and all(Path(f).is_absolute() for f in files)
    assert files[0] == str(listing.parent / "images/cat/cat_00.png")


@pytest.mark.slow
def test_train_evaluate_predict_from_a_csv(listed, tmp_path, capsys):
    import tlapp

    listing, _ = listed
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", listing, "--backbone", "resnet50", "--weights",
                             "none", "--image-size", 32, "--epochs", 2, "--batch-size", 8,
                             "--cache-dir", tmp_path / "cache", "--out", run)
    assert code == 0, err
    split = json.loads((run / "split.json").read_text())
    assert {item["line"] for item in split["skipped"]} == {22, 23, 24}
    assert (run / "labels.txt").read_text().split() == ["cat", "dog", "fox"]
    code, out, err = run_cli(capsys, "evaluate", run, "--out", tmp_path / "ev1")
    assert code == 0, err
    code, out, err = run_cli(capsys, "evaluate", run, "--data", listing, "--out",
                             tmp_path / "ev2")
    assert code == 0, err
    metrics = json.loads((tmp_path / "ev2" / "metrics.json").read_text())["evaluate"]
    assert metrics["count"] == 20
    assert {name: c["support"] for name, c in metrics["per_class"].items()} == \
        {"cat": 7, "dog": 7, "fox": 6}  # 6 each, far.png (cat), "a, b.png" (dog)
    first = json.loads((tmp_path / "ev1" / "metrics.json").read_text())["evaluate"]
    assert first["count"] == len(split["test"])
    code, out, err = run_cli(capsys, "predict", listing, "--model", run, "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 23
    assert sum("error" in line for line in lines) == 1  # the missing file, reported
    # the same from Python, with --label-from and --group-by on a folder
    data = pets(tmp_path / "pets")
    result = tlapp.train(str(data), backbone="lenet5", weights="none", epochs=1, batch_size=8,
                         label_from=r"([^/]+)_\d+\.jpg$", group_by=r"_(\d)\.jpg$",
                         val_fraction=0.3, test_fraction=0.3,
                         cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "pets-run"))
    assert result.labels == ["Abyssinian", "beagle", "great_pyrenees"]
    saved = json.loads((tmp_path / "pets-run" / "metrics.json").read_text())
    assert sum(saved["counts"]["groups"].values()) == 6
    split = json.loads((tmp_path / "pets-run" / "split.json").read_text())
    by_index = {}
    for name in ("train", "val", "test"):
        for path in split[name]:
            by_index.setdefault(path[-5], set()).add(name)
    assert len(by_index) == 6 and all(len(v) == 1 for v in by_index.values())


# --- multi-label ------------------------------------------------------------------------

def test_thresholds_maximise_f1_and_average_precision():
    from tlapp.inference import multilabel

    targets = np.array([[1, 0], [1, 0], [0, 1], [0, 0], [1, 1]], np.float32)
    probabilities = np.array([[.9, .2], [.35, .1], [.3, .8], [.1, .4], [.6, .45]])
    thresholds = multilabel.tune_thresholds(targets, probabilities, 2)
    assert 0.3 < thresholds[0] <= 0.35  # all three positives, no negative
    assert 0.4 < thresholds[1] <= 0.45
    result = multilabel.multilabel_metrics(targets, probabilities, ["a", "b"], thresholds)
    assert result["micro_f1"] == result["macro_f1"] == result["accuracy"] == 1.0
    assert result["mAP"] == 1.0
    # a ranking with a negative first: AP = (1/2 + 2/3) / 2
    assert multilabel.average_precision(np.array([0, 1, 1]), np.array([.9, .8, .7])) == \
        pytest.approx((1 / 2 + 2 / 3) / 2)
    assert multilabel.tune_thresholds(None, None, 3) == [0.5] * 3
    worse = multilabel.multilabel_metrics(targets, probabilities, ["a", "b"], [0.95, 0.95])
    assert worse["micro_f1"] == 0.0 and worse["per_label"]["a"]["recall"] == 0.0


def striped(path: Path, red: bool, stripes: bool, rng) -> Path:
    from PIL import Image

    hue = np.array([220, 40, 40] if red else [40, 60, 220], np.float32)
    pixels = hue + rng.normal(0, 20, (40, 40, 3))
    if stripes:
        pixels[(np.arange(40) // 3) % 2 == 0] = 245
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def multi_csv(tmp_path):
    """Colour decides red/blue, the pattern decides striped: several labels per image."""
    rng = np.random.default_rng(5)
    rows = []
    for red in (True, False):
        for stripes in (True, False):
            for i in range(8):
                name = f"img/{'red' if red else 'blue'}_{'s' if stripes else 'p'}{i}.png"
                striped(tmp_path / name, red, stripes, rng)
                rows.append([name, ";".join(["red" if red else "blue"] +
                                            (["striped"] if stripes else []))])
    return write_csv(tmp_path / "multi.csv", rows)


def test_multi_label_rows_need_the_option(multi_csv):
    scanned = scan_folder(multi_csv)
    assert {i["reason"] for i in scanned.skipped} == {"several labels"}
    assert "--multi-label" in scanned.skipped[0]["detail"]
    scanned = scan_folder(multi_csv, multi_label=True)
    assert scanned.classes == ["blue", "red", "striped"] and len(scanned.samples) == 32
    assert scanned.counts()["per_class"] == {"blue": 16, "red": 16, "striped": 16}
    first = next(s for s in scanned.samples if s.path == "img/red_s0.png")
    assert [scanned.classes[i] for i in first.labels] == ["red", "striped"]
    split = scanned.split_json()
    where = next(n for n in ("train", "val", "test") if "img/red_s0.png" in split[n])
    assert split["labels"][where][split[where].index("img/red_s0.png")] == ["red", "striped"]
    with pytest.raises(UserInputError, match="--multi-label needs a CSV"):
        scan_folder(multi_csv.parent / "img", multi_label=True)


@pytest.mark.slow
def test_multi_label_train_predict_evaluate_export_agree(multi_csv, tmp_path, capsys):
    import tensorflow as tf

    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", multi_csv, "--multi-label", "--backbone",
                             "resnet50", "--weights", "none", "--image-size", 32, "--epochs",
                             30, "--batch-size", 8, "--lr", "0.01", "--val-fraction", "0.25",
                             "--cache-dir", tmp_path / "cache", "--out", run)
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    thresholds = json.loads((run / "thresholds.json").read_text())
    assert thresholds["labels"] == ["blue", "red", "striped"]
    assert metrics["thresholds"] == thresholds["thresholds"]
    assert {"micro_f1", "macro_f1", "mAP", "per_label"} <= set(metrics["val"])
    assert (run / "per_label.csv").is_file() or not metrics["test"]["count"]

    # every label beats chance on the whole list (positives are half of the images)
    code, out, err = run_cli(capsys, "evaluate", run, "--data", multi_csv, "--out",
                             tmp_path / "ev")
    assert code == 0, err
    result = json.loads((tmp_path / "ev" / "metrics.json").read_text())["evaluate"]
    assert result["count"] == 32
    for name, row in result["per_label"].items():
        assert row["average_precision"] > 0.75, (name, row)
    assert result["micro_f1"] > 0.7

    code, out, err = run_cli(capsys, "predict", multi_csv, "--model", run, "--json")
    assert code == 0, err
    predicted = {Path(r["path"]).name: r for r in map(json.loads, out.splitlines())}
    assert len(predicted) == 32
    loaded = tf.saved_model.load(str(run / "saved_model"))
    names = sorted(predicted)[:6]
    served = loaded.signatures["serving_default"](images=tf.constant(
        [(multi_csv.parent / "img" / n).read_bytes() for n in names]))
    for i, name in enumerate(names):
        mine = predicted[name]
        np.testing.assert_allclose(served["probabilities"][i].numpy(),
                                   [mine["probabilities"][k] for k in thresholds["labels"]],
                                   atol=1e-4)
        chosen = [s.decode() for s in served["predicted_labels"][i].numpy() if s]
        assert sorted(chosen) == sorted(p["label"] for p in mine["predictions"])
    export = json.loads((run / "saved_model" / "assets" / "export.json").read_text())
    assert export["multi_label"] and export["thresholds"] == thresholds["thresholds"]

    # a single-label run on the same images reuses every cached row: labels are not in it
    single = write_csv(tmp_path / "colour.csv", [[f"img/{n}", n.split("_")[0]]
                                                 for n in sorted(predicted)])
    code, out, err = run_cli(capsys, "train", single, "--backbone", "resnet50", "--weights",
                             "none", "--image-size", 32, "--epochs", 1, "--batch-size", 8,
                             "--val-fraction", "0.25", "--cache-dir", tmp_path / "cache",
                             "--out", tmp_path / "single")
    assert code == 0, err
    cache = json.loads((tmp_path / "single" / "metrics.json").read_text())["cache"]
    assert cache["extracted"] == 0 and cache["reused"] == 32
