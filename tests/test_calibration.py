"""Calibrated probabilities (temperature scaling) and "none of these" (reject below P)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_folder, run_cli
from tlapp.inference import calibration


def test_ece_against_a_hand_computed_example():
    probabilities = np.array([[.9, .1], [.2, .8], [.6, .4], [.3, .7]])
    labels = np.array([0, 0, 0, 1])
    # top confidences .9 .8 .6 .7 fall in four different bins of 15; right, wrong, right,
    # right: (|1 - .9| + |0 - .8| + |1 - .6| + |1 - .7|) / 4
    assert calibration.ece(probabilities, labels) == pytest.approx(1.6 / 4)
    # two images in one bin: |mean accuracy - mean confidence| weighted by 2
    both = np.array([[.91, .09], [.93, .07]])
    assert calibration.ece(both, np.array([0, 1])) == pytest.approx(abs(0.5 - 0.92))
    assert calibration.nll(probabilities, labels) == pytest.approx(
        -np.mean(np.log([.9, .2, .6, .7])))


def test_temperature_undoes_over_confidence():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (4000, 4))
    honest = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # labels drawn from `honest`: calibrated by construction ...
    labels = (rng.random((4000, 1)) > honest.cumsum(axis=1)).sum(axis=1)
    over = calibration.scale(honest, 1 / 4)  # ... then made four times too sure of itself
    temperature = calibration.fit_temperature(over, labels)
    assert 3.5 < temperature < 4.5
    fixed = calibration.scale(over, temperature)
    assert calibration.nll(fixed, labels) < calibration.nll(over, labels) - 0.3
    assert calibration.ece(fixed, labels) < calibration.ece(over, labels) / 3
    np.testing.assert_array_equal(fixed.argmax(axis=1), over.argmax(axis=1))
    np.testing.assert_allclose(calibration.scale(over, 1.0), over, atol=1e-9)


def test_baked_temperature_equals_scaling_the_probabilities():
    import keras

    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax",
                                                   name="probabilities")(inputs))
    x = np.random.default_rng(1).normal(0, 3, (16, 5)).astype(np.float32)
    before = model.predict(x, verbose=0)
    calibration.bake_temperature(model, 2.5)
    np.testing.assert_allclose(model.predict(x, verbose=0), calibration.scale(before, 2.5),
                               atol=1e-5)


def test_auto_threshold_keeps_the_share_asked_for():
    probabilities = np.array([[.2, .8], [.4, .6], [.45, .55], [.1, .9]])
    p = calibration.auto_threshold(probabilities, 0.75)
    assert p == pytest.approx(0.6)
    kept = calibration.selective(probabilities, np.array([1, 1, 0, 1]), p)
    assert kept["coverage"] == 0.75 and kept["selective_accuracy"] == 1.0
    coverage, accuracy = calibration.coverage_curve(probabilities, np.array([1, 1, 0, 1]))
    np.testing.assert_allclose(coverage, [.25, .5, .75, 1])
    np.testing.assert_allclose(accuracy, [1, 1, 1, .75])


@pytest.mark.parametrize("value", [1.5, -0.1, "high", float("nan")])
def test_reject_below_outside_0_1_is_refused(trained_run, tmp_path, capsys, value):
    image = next(Path(trained_run.config.data).rglob("*.png"))
    code, out, err = run_cli(capsys, "predict", image, "--model", trained_run.path,
                             "--reject-below", value)
    assert code == 2 and "Traceback" not in err
    assert "reject_below" in err or "expected a number or 'auto'" in err


def test_bad_reject_options_when_training(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=3)
    for args, message in ((["--reject-below", "2"], "reject_below"),
                          (["--keep", "0"], "keep")):
        code, out, err = run_cli(capsys, "train", data, "--backbone", "lenet5", "--weights",
                                 "none", "--out", tmp_path / "run", *args)
        assert code == 2 and message in err and "Traceback" not in err


def test_savedmodel_and_predict_agree_on_unknown_with_and_without_tta(trained_run, tmp_path,
                                                                      capsys):
    import tensorflow as tf
    from PIL import Image

    rng = np.random.default_rng(0)
    images = sorted(str(p) for p in Path(trained_run.config.data).rglob("*.*"))[::3]
    for i in range(8):  # noise and flat grey: none of the classes, so less sure answers
        path = tmp_path / f"odd{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3)).astype(np.uint8) if i % 2 else
                        np.full((40, 40, 3), 30 * i, np.uint8)).save(path)
        images.append(str(path))
    for tta in ("none", "flip"):
        plain = trained_run.predict(images, top_k=3, tta=tta)
        tops = sorted({r["predictions"][0]["probability"] for r in plain})
        threshold = float(tops[len(tops) // 2])  # about half are unknown
        mine = trained_run.predict(images, top_k=3, tta=tta, reject_below=threshold)
        assert any(r["label"] is None for r in mine) and any(r["label"] for r in mine)
        out = tmp_path / f"sm-{tta}"
        code, _, err = run_cli(capsys, "export", trained_run.path, "--out", out, "--tta", tta,
                               "--reject-below", threshold)
        assert code == 0, err
        assert json.loads((out / "assets" / "export.json").read_text())["reject_below"] == \
            threshold
        served = tf.saved_model.load(str(out)).signatures["serving_default"](
            images=tf.constant([Path(p).read_bytes() for p in images]))
        for i, result in enumerate(mine):
            top = result["predictions"][0]
            assert served["probabilities"][i].numpy().max() == pytest.approx(
                top["probability"], abs=1e-4)
            name = served["class_name"][i].numpy().decode()
            if abs(top["probability"] - threshold) > 1e-4:  # not on the edge
                assert (name == "unknown") == (result["label"] is None)
                assert (int(served["class_index"][i]) == -1) == (result["label"] is None)
                assert result["label"] in (None, name)


def test_runs_without_a_reject_threshold_answer_every_image(trained_run):
    images = sorted(str(p) for p in Path(trained_run.config.data).rglob("*.*"))[:4]
    assert trained_run.reject_below is None
    assert all(r["label"] == r["predictions"][0]["label"] for r in trained_run.predict(images))


@pytest.mark.slow
def test_a_run_calibrates_rejects_and_reports(tmp_path, capsys):
    # hues closer than their noise: classes overlap, so validation has mistakes
    data = make_folder(tmp_path / "data", per_class=16, classes={"a": 0.0, "b": 0.04,
                                                                  "c": 0.08})
    run = tmp_path / "run"
    # no dropout and many epochs at a high rate: an over-confident head
    code, out, err = run_cli(capsys, "train", data, "--backbone", "resnet50", "--weights",
                             "none", "--image-size", 32, "--epochs", 40, "--lr", "0.05",
                             "--dropout", 0, "--batch-size", 8, "--val-fraction", "0.3",
                             "--reject-below", "auto", "--keep", "0.8", "--cache-dir",
                             tmp_path / "cache", "--out", run)
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    block = metrics["calibration"]
    assert block["temperature"] != 1.0
    assert block["val"]["nll_after"] <= block["val"]["nll_before"] + 1e-9
    assert {"ece_before", "ece_after"} <= set(block["val"])
    assert (run / "plots" / "reliability.png").is_file()
    assert (run / "plots" / "coverage.png").is_file()
    reject = json.loads((run / "reject.json").read_text())
    assert reject["chosen"] == "auto" and 0 < reject["reject_below"] <= 1
    assert metrics["reject"]["val"]["coverage"] >= 0.8 - 1e-9
    # The SavedModel was traced before training: it must hold the final values all the same
    # (the trained weights, the temperature baked after evaluation, the chosen threshold).
    import tensorflow as tf

    import tlapp

    finished = tlapp.load_run(run)
    files = [str(p) for p in sorted((data / "a").iterdir())[:6]]
    served = tf.saved_model.load(str(run / "saved_model")).signatures["serving_default"](
        images=tf.constant([Path(f).read_bytes() for f in files]))
    mine = finished.predict(files, top_k=3, reject_below=reject["reject_below"])
    np.testing.assert_allclose(
        served["probabilities"].numpy().max(axis=1),
        [r["predictions"][0]["probability"] for r in mine], atol=1e-5)
    assert [n.decode() for n in served["class_name"].numpy()] == [
        r["label"] or "unknown" for r in mine]
    assert json.loads((run / "saved_model" / "assets" / "export.json").read_text())[
        "reject_below"] == reject["reject_below"]

    code, out, err = run_cli(capsys, "evaluate", run, "--reject-below", "auto")
    assert code == 0, err
    evaluation = json.loads((run / "metrics.json").read_text())["evaluate"]
    assert evaluation["selective"]["reject_below"] == reject["reject_below"]
    assert "answered" in out

    off = tmp_path / "off"
    code, out, err = run_cli(capsys, "train", data, "--backbone", "resnet50", "--weights",
                             "none", "--image-size", 32, "--epochs", 2, "--batch-size", 8,
                             "--calibrate", "off", "--cache-dir", tmp_path / "cache",
                             "--out", off)
    assert code == 0, err
    assert json.loads((off / "metrics.json").read_text())["calibration"] == {
        "temperature": 1.0, "skipped": "calibrate = off"}
