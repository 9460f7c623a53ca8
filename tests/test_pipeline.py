import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tlapp
from tests.conftest import make_folder
from tlapp import cli, config as config_lib
from tlapp.data import datasets
from tlapp.features import extract
from tlapp.data import decoding

RUN_FILES = ["config.toml", "labels.txt", "split.json", "history.csv", "metrics.json",
             "model.keras", "saved_model/saved_model.pb", "plots/training_curves.png",
             "plots/confusion_matrix.png"]


def test_run_folder_has_every_file(trained_run):
    for name in RUN_FILES:
        assert (trained_run.path / name).exists(), name
    assert list((trained_run.path / "logs").rglob("*tfevents*"))
    assert not list(trained_run.path.parent.glob(".*partial"))
    assert (trained_run.path / "labels.txt").read_text().split() == ["cat", "dog", "fox"]
    for plot in ("training_curves", "confusion_matrix"):
        assert (trained_run.path / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_and_history_are_in_range(trained_run):
    metrics = json.loads((trained_run.path / "metrics.json").read_text())
    for key in ("val_accuracy", "test_accuracy"):
        assert 0 <= metrics[key] <= 1
    counts = metrics["counts"]
    assert counts["found"] == counts["used"] + counts["skipped"] + counts["ignored"]
    assert counts["train"] + counts["val"] + counts["test"] == counts["used"]
    assert counts["per_class"] == {"cat": 8, "dog": 8, "fox": 8}
    assert metrics["counts"]["used"] == 24 and metrics["counts"]["skipped"] == 0
    assert sum(c["support"] for c in metrics["test"]["per_class"].values()) == \
        metrics["counts"]["test"]
    # colour-coded classes are easy even for random features
    assert metrics["test_accuracy"] > 0.5
    with open(trained_run.path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    assert {r["stage"] for r in rows} == {"head"}


def test_config_toml_reproduces_the_run_settings(trained_run):
    config = config_lib.from_dict(config_lib.load_toml(trained_run.path / "config.toml"))
    assert config == trained_run.config
    assert config.cut == "conv5_block3_out" and config.image_size == 32


@pytest.mark.slow
def test_second_identical_run_never_runs_the_stem(trained_run, tmp_path, monkeypatch, caplog):
    def no_images(*args, **kwargs):
        raise AssertionError("the stem ran although every row was cached")

    monkeypatch.setattr(datasets, "image_dataset", no_images)
    monkeypatch.setattr(extract, "views_dataset", no_images)
    config = trained_run.config.replace(out=str(tmp_path / "again"))
    caplog.set_level("INFO", "tlapp")
    again = tlapp.pipeline.run(config)
    assert "cache: 24/24 images already extracted" in caplog.text
    assert again.metrics["cache"] == trained_run.metrics["cache"] | {"extracted": 0,
                                                                      "reused": 24}
    assert again.metrics["test_accuracy"] == trained_run.metrics["test_accuracy"]
    assert again.metrics["val"] == trained_run.metrics["val"]


@pytest.mark.slow
def test_new_images_extract_only_themselves(trained_run, tmp_path):
    data = tmp_path / "data"
    make_folder(data, per_class=8)  # same pixels as the run's data: same content hashes
    make_folder(data / "..", per_class=0)
    from tests.conftest import write_image
    write_image(data / "cat" / "extra.png", 0.02, np.random.default_rng(9))
    config = trained_run.config.replace(data=str(data), out=str(tmp_path / "more"))
    more = tlapp.pipeline.run(config)
    assert more.metrics["cache"]["extracted"] == 1
    assert more.metrics["cache"]["reused"] == 24


@pytest.mark.slow
def test_load_run_predicts_like_the_trained_model(trained_run):
    run = tlapp.load_run(trained_run.path)
    files = sorted(str(p) for p in (trained_run.path.parent / "data" / "dog").iterdir())[:3]
    results = run.predict(files, top_k=3)
    assert [r["path"] for r in results] == files
    for r in results:
        assert len(r["predictions"]) == 3
        assert abs(sum(p["probability"] for p in r["predictions"]) - 1) < 1e-5
    pixels = np.stack([decoding.decode_image(open(f, "rb").read(), 32) for f in files])
    np.testing.assert_allclose(run.model.predict(pixels, verbose=0),
                               trained_run.model.predict(pixels, verbose=0), atol=1e-6)


SERVE = """
import json, sys
import tensorflow as tf
assert "tlapp" not in sys.modules
model = tf.saved_model.load(sys.argv[1])
files = sys.argv[2:]
out = model.signatures["serving_default"](images=tf.constant([open(f, "rb").read() for f in files]))
print(json.dumps({"probabilities": out["probabilities"].numpy().tolist(),
                  "class_name": [n.decode() for n in out["class_name"].numpy()],
                  "class_index": out["class_index"].numpy().tolist()}))
"""


@pytest.mark.slow
def test_saved_model_in_fresh_process_equals_tlapp_predict(trained_run, capsys):
    files = sorted(str(p) for p in (trained_run.path.parent / "data").rglob("*_0[0-2].*"))
    assert cli.main(["predict", *files, "--model", str(trained_run.path), "--json",
                     "--top-k", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    served = subprocess.run([sys.executable, "-c", SERVE, str(trained_run.path / "saved_model"),
                             *files], capture_output=True, text=True, check=True, cwd="/")
    served = json.loads(served.stdout.strip().splitlines()[-1])
    labels = trained_run.labels
    for line, probabilities, name in zip(lines, served["probabilities"], served["class_name"]):
        by_label = {p["label"]: p["probability"] for p in line["predictions"]}
        np.testing.assert_allclose([by_label[label] for label in labels], probabilities,
                                   atol=1e-5)
        assert name == line["predictions"][0]["label"]


@pytest.mark.slow
def test_predict_in_a_fresh_process_loads_the_run(trained_run):
    """model.keras holds tlapp's own layers; a new process must know them before loading."""
    image = next((trained_run.path.parent / "data" / "cat").iterdir())
    result = subprocess.run([sys.executable, "-m", "tlapp", "predict", str(image), "--model",
                             str(trained_run.path), "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["predictions"][0]["label"] in trained_run.labels


@pytest.mark.slow
def test_saved_model_pixel_signature(trained_run):
    import tensorflow as tf

    served = tf.saved_model.load(str(trained_run.path / "saved_model"))
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    out = served.signatures["serving_pixels"](pixels=tf.constant(pixels))
    np.testing.assert_allclose(out["probabilities"].numpy(),
                               trained_run.model.predict(pixels, verbose=0), atol=1e-5)
    assert out["class_index"].shape == (2,)


@pytest.mark.slow
def test_evaluate_and_export_commands(trained_run, tmp_path, capsys):
    assert cli.main(["evaluate", str(trained_run.path)]) == 0
    assert "accuracy" in capsys.readouterr().out
    metrics = json.loads((trained_run.path / "metrics.json").read_text())
    assert metrics["evaluate"]["count"] == metrics["counts"]["test"]
    assert abs(metrics["evaluate"]["accuracy"] - metrics["test_accuracy"]) < 1e-6
    assert cli.main(["export", str(trained_run.path), "--out", str(tmp_path / "sm")]) == 0
    assert (tmp_path / "sm" / "saved_model.pb").is_file()
    assert (tmp_path / "sm" / "assets" / "labels.txt").read_text().split() == trained_run.labels


@pytest.mark.slow
def test_spatial_cut_trains_the_top_and_saves_consistently(tmp_path):
    data = make_folder(tmp_path / "data", per_class=5)
    run = tlapp.train(str(data), backbone="vgg16", weights="none", trainable_blocks=1,
                      image_size=32, epochs=2, batch_size=8, cache_dir=str(tmp_path / "cache"),
                      out=str(tmp_path / "run"))
    assert run.config.cut == "block4_pool"
    assert run.metrics["cache"]["extracted"] == 15
    reloaded = tlapp.load_run(run.path).model
    trainable = [layer.name for layer in reloaded.get_layer("vgg16").layers
                 if layer.trainable and layer.weights]
    assert trainable == ["block5_conv1", "block5_conv2", "block5_conv3"]
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(reloaded.predict(pixels, verbose=0),
                               run.model.predict(pixels, verbose=0), atol=1e-6)


def test_existing_output_folder_is_refused(trained_run):
    with pytest.raises(tlapp.UserInputError, match="already exists"):
        tlapp.pipeline.run(trained_run.config)


@pytest.mark.slow
def test_tfds_dataset_trains_through_the_folder_path(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=100):
        run = tlapp.train("tfds:mnist", backbone="vgg16", weights="none", image_size=32,
                          epochs=1, cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"))
    assert run.config.data == "tfds:mnist"
    assert len(run.labels) == 10 and run.labels[3] == "3_3"
    assert run.metrics["counts"]["train"] == 100 and run.metrics["counts"]["test"] == 100
    assert (tmp_path / "cache" / "tfds" / "mnist" / "val").is_dir()
    split = json.loads((run.path / "split.json").read_text())
    assert all(p.startswith("train/") for p in split["train"])


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
def test_trainings_in_one_process_do_not_leak_file_descriptors(tmp_path):
    """Each run's feature loaders are closed: a long experiment does not run out of files."""
    data = make_folder(tmp_path / "data", per_class=4)

    def train(name):
        tlapp.train(str(data), backbone="resnet50", weights="none", image_size=32,
                    epochs=1, cache_dir=str(tmp_path / "cache"), out=str(tmp_path / name))

    train("first")  # TensorFlow opens what it keeps for the process during the first run
    before = open_descriptors()
    for name in ("second", "third"):
        train(name)
    assert open_descriptors() <= before


def test_feature_loader_closes_its_shards(trained_run):
    from tlapp.data.scan import scan_folder
    from tlapp.features.cache import FeatureCache
    from tlapp.features.entries import list_entries
    from tlapp.features.loader import FeatureLoader

    (entry,) = list_entries(Path(trained_run.config.cache_dir))
    cache = FeatureCache(trained_run.config.cache_dir, entry["key"])
    digests = [s.sha256 for s in scan_folder(trained_run.config.data).samples]
    assert not cache.missing(digests)
    before = open_descriptors()
    with FeatureLoader(cache, digests, np.zeros(len(digests), np.int32), 3) as loader:
        loader(np.arange(len(digests), dtype=np.int64))
        assert open_descriptors() > before
    assert open_descriptors() == before


@pytest.mark.slow
def test_log_file_output_has_one_line_per_epoch(tmp_path):
    """Output that is not a terminal gets one line per epoch, not every step's redraw, and no
    TensorFlow start-up lines."""
    data = make_folder(tmp_path / "data", per_class=4)
    result = subprocess.run(
        [sys.executable, "-m", "tlapp", "train", str(data), "--backbone", "vgg16", "--weights",
         "none", "--image-size", "32", "--epochs", "3", "--batch-size", "2", "--cache-dir",
         str(tmp_path / "cache"), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert "\r" not in text and "\b" not in text and "\x1b[" not in text
    epochs = [line for line in result.stdout.splitlines() if line.startswith("Epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/3", "2/3", "3/3"]
    steps = [line for line in result.stdout.splitlines() if " - loss: " in line]
    assert len(steps) == 3  # one summary line per epoch
    for noise in ("oneDNN", "cuda drivers", "cuInit", "absl::InitializeLog"):
        assert noise not in text
    assert "scan: used 12 of 12 files" in result.stderr
    assert "done: val accuracy" in result.stderr


# --- the run folder: locks, names, disk full (hardening) ---------------------------------------

def hold_run_lock(out: Path, seconds: float):
    """A process that holds `out`'s run lock (as a training run does) for `seconds`."""
    code = ("import sys, time; from pathlib import Path; from tlapp.pipeline import folder\n"
            f"with folder.run_lock(Path({str(out)!r})):\n"
            "    print('locked', flush=True); time.sleep(float(sys.argv[1]))\n")
    process = subprocess.Popen([sys.executable, "-c", code, str(seconds)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_process_on_the_same_out_exits_2_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "same"
    holder = hold_run_lock(out, 60)
    try:
        for args in (["train", str(tmp_path / "data"), "--out", str(out)],
                     ["train", "--resume", str(out)]):
            (tmp_path / f".{out.name}.partial").mkdir(exist_ok=True)
            (tmp_path / f".{out.name}.partial" / "config.toml").write_text(
                f'data = "{tmp_path / "data"}"\nout = "{out}"\n')
            assert cli.main(args) == 2
            err = capsys.readouterr().err
            assert f"Another tlapp process (PID {holder.pid}) is writing the run" in err
            assert (tmp_path / f".{out.name}.partial" / "config.toml").is_file()  # untouched
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    from tlapp.pipeline import folder

    out = tmp_path / "run"
    holder = hold_run_lock(out, 60)
    holder.kill()
    holder.wait()
    assert (tmp_path / ".run.lock").is_file()  # killed: it could not remove it
    with folder.run_lock(out):
        assert (tmp_path / ".run.lock").read_text().strip() == str(os.getpid())
    assert not (tmp_path / ".run.lock").exists()


def test_out_names_that_cannot_be_written_are_refused(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=3)
    long_name = "r" * 250
    assert cli.main(["train", str(data), "--out", str(tmp_path / long_name)]) == 2
    assert "must be at most 240" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main(["train", str(data), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert cli.main(["train", str(data / "cat" / "cat_00.png")]) == 2
    assert "is a file, but DATA must be a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "file"]


def test_finished_run_never_replaces_what_appeared_at_out(tmp_path):
    from tlapp.pipeline import folder

    temp, out = tmp_path / ".run.partial", tmp_path / "run"
    temp.mkdir()
    out.mkdir()
    (out / "theirs.txt").write_text("t")
    with pytest.raises(tlapp.UserInputError, match="appeared while the run was training"):
        folder.finish_run(temp, out, {"val_accuracy": 1.0})
    assert (out / "theirs.txt").read_text() == "t" and (temp / "metrics.json").is_file()


@pytest.mark.slow
def test_disk_full_in_the_run_folder_is_a_message(trained_run, tmp_path, monkeypatch, capsys):
    import keras

    def full(*args, **kwargs):
        raise OSError("8192 requested and 0 written")

    monkeypatch.setattr(keras.Model, "save", full)
    config = trained_run.config.replace(out=str(tmp_path / "run"), epochs=1)
    with pytest.raises(tlapp.UserInputError, match="disk holding the run folder is full") as e:
        tlapp.pipeline.run(config)
    assert f"tlapp train --resume {tmp_path / 'run'}" in str(e.value)
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / ".run.lock").exists()
