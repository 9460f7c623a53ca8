import csv
import re
import json

import pytest

from tests.conftest import make_folder
from tlapp import cli, experiments
from tlapp.config import UserInputError


def test_grid_expansion_and_names():
    planned = experiments.plan_runs({"epochs": 1}, {"backbone": ["vgg16", "resnet50"],
                                                    "lr": [0.001, 1e-4]}, [])
    assert [p.name for p in planned] == ["backbone=vgg16,lr=0.001", "backbone=vgg16,lr=0.0001",
                                         "backbone=resnet50,lr=0.001",
                                         "backbone=resnet50,lr=0.0001"]
    assert planned[3].values == {"epochs": 1, "backbone": "resnet50", "lr": 1e-4}


def test_runs_are_crossed_with_the_sweep_and_named_by_what_differs():
    runs = [{"name": "scratch", "backbone": "lenet5", "trainable_blocks": "all"},
            {"backbone": "models/my net.keras", "lr": 0.01}]
    planned = experiments.plan_runs({"lr": 0.1}, {"seed": [0, 1], "epochs": [3]}, runs)
    assert [p.name for p in planned] == ["scratch,seed=0", "scratch,seed=1",
                                         "backbone=my_net,lr=0.01,seed=0",
                                         "backbone=my_net,lr=0.01,seed=1"]
    assert planned[0].values == {"lr": 0.1, "backbone": "lenet5", "trainable_blocks": "all",
                                 "seed": 0, "epochs": 3}
    assert planned[0].settings == {"backbone": "lenet5", "trainable_blocks": "all",
                                   "lr": 0.1, "seed": 0}
    assert planned[2].settings["trainable_blocks"] is None  # resolved per backbone
    assert planned[2].settings["backbone"] == "models/my net.keras"
    explicit_default = experiments.plan_runs({}, {}, [{"lr": 0.001, "seed": 0}, {"seed": 1}])
    assert [p.name for p in explicit_default] == ["seed=0", "seed=1"]  # lr=0.001: default
    assert explicit_default[0].settings == {"seed": 0}
    same = experiments.plan_runs({}, {}, [{"lr": 0.1}, {"lr": 0.1}])
    assert [p.name for p in same] == ["run", "run-2"]
    assert experiments.plan_runs({"lr": 0.1}, {}, [{"lr": 0.1}, {"seed": 0}])[0].name == "run"


@pytest.mark.parametrize("text, message", [
    ("epoch = 1", "unknown key 'epoch'"),
    ("[sweep]\nlr = 0.1", "must be a non-empty list. Received: lr=0.1"),
    ("[sweep]\nlr = []", "non-empty list"),
    ("[sweep]\ncache_dir = ['a', 'b']", "'cache_dir' is shared by all runs"),
    ("[sweep]\nlr = [0.1]\n[[runs]]\nlr = 0.2", "lr is set in both"),
    ("[[runs]]\nout = 'x'", "'out' is shared by all runs"),
    ("[grid]\nlr = [0.1]", "unknown table [grid]"),
])
def test_bad_experiment_files_exit_2_before_training(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    assert cli.main(["experiment", str(path), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A real experiment: a run that fails first, then two vgg16 runs that differ only in lr."""
    base = tmp_path_factory.mktemp("experiment")
    data = make_folder(base / "data", per_class=5)
    path = base / "exp.toml"
    path.write_text(f'data = "{data}"\nbackbone = "vgg16"\nweights = "none"\nimage_size = 32\n'
                    f'epochs = 1\nbatch_size = 8\ncache_dir = "{base / "cache"}"\n'
                    f'out = "{base / "out"}"\n'
                    f'[[runs]]\nname = "broken"\nbackbone = "lenet5"\nweights = "imagenet"\n'
                    f'[[runs]]\nlr = 0.001\n[[runs]]\nlr = 0.01\n')
    status = cli.main(["experiment", str(path)])
    return status, base / "out", path


def read_rows(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_experiment_writes_one_row_per_run_and_continues_after_a_failure(experiment):
    status, out, _ = experiment
    assert status == 2  # the only failure is bad input
    rows = read_rows(out)
    assert [r["run"] for r in rows] == ["broken", "lr=0.001", "lr=0.01"]
    assert [r["backbone"] for r in rows] == ["lenet5", "vgg16", "vgg16"]  # with the base's
    assert [r["status"] for r in rows] == ["failed", "trained", "trained"]
    assert "lenet5 has no pretrained weights" in rows[0]["error"]
    assert "UserInputError" in (out / "errors" / "broken.txt").read_text()
    for row in rows[1:]:
        metrics = json.loads((out / row["run"] / "metrics.json").read_text())
        assert float(row["val_accuracy"]) == pytest.approx(metrics["val_accuracy"])
        assert float(row["train_s"]) == pytest.approx(metrics["timings"]["train_s"])
    table = (out / "results.md").read_text()
    assert "| run | backbone | weights | lr | status | val acc | test acc |" in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + 3
    assert "- broken: UserInputError: lenet5 has no pretrained weights" in table
    assert (out / "plots" / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "experiment.toml").is_file()


def test_runs_sharing_a_stem_extract_it_once(experiment):
    rows = read_rows(experiment[1])
    first, second = rows[1], rows[2]
    assert (first["cache_extracted"], first["cache_reused"]) == ("15", "0")
    assert (second["cache_extracted"], second["cache_reused"]) == ("0", "15")
    assert "| 15/15 |" in (experiment[1] / "results.md").read_text()


@pytest.mark.slow
def test_runs_of_an_experiment_skip_the_saved_model_and_export_it_on_demand(experiment,
                                                                             capsys):
    """Issue 14: a run of an experiment is written without RUN/saved_model (config and
    metrics say so); predict works on it, and 'tlapp export RUN' writes the SavedModel,
    which answers as predict does."""
    import numpy as np
    import tensorflow as tf

    run = experiment[1] / "lr=0.01"
    assert not (run / "saved_model").exists()
    assert 'saved_model = "off"' in (run / "config.toml").read_text()
    assert 'gradcam = "off"' in (run / "config.toml").read_text()  # 'tlapp report' draws them
    assert json.loads((run / "metrics.json").read_text())["saved_model"]["written"] is False
    image = next(p for p in (experiment[1].parent / "data").rglob("*.jpg"))
    capsys.readouterr()
    assert cli.main(["predict", str(image), "--model", str(run), "--json", "--top-k", "3"]) == 0
    predicted = json.loads(capsys.readouterr().out.splitlines()[0])["predictions"]
    assert cli.main(["export", str(run)]) == 0
    served = tf.saved_model.load(str(run / "saved_model")).signatures["serving_default"](
        images=tf.constant([image.read_bytes()]))
    labels = (run / "labels.txt").read_text().split()
    assert labels[int(served["class_index"][0])] == predicted[0]["label"]
    np.testing.assert_allclose(
        served["probabilities"].numpy()[0][[labels.index(p["label"]) for p in predicted]],
        [p["probability"] for p in predicted], atol=1e-4)


def test_rerun_skips_finished_runs(experiment, monkeypatch, capsys):
    status, out, path = experiment
    calls = []
    original = experiments.pipeline.run
    monkeypatch.setattr(experiments.pipeline, "run",
                        lambda config, **kw: calls.append(config.out) or original(config, **kw))
    assert cli.main(["experiment", str(path)]) == 2
    assert calls == [str(out / "broken")]  # only the unfinished run is tried again
    rows = read_rows(out)
    assert [r["status"] for r in rows] == ["failed", "skipped", "skipped"]
    assert rows[2]["cache_reused"] == "15"  # read back from the finished run's metrics
    assert "finished earlier, skipped" in capsys.readouterr().err
    path.write_text(path.read_text().replace("epochs = 1", "epochs = 2"))
    assert cli.main(["experiment", str(path)]) == 2
    assert "note: lr=0.01 was trained with epochs=1" in capsys.readouterr().err
    assert [r["status"] for r in read_rows(out)] == ["failed", "skipped", "skipped"]


def test_unexpected_errors_are_recorded_and_exit_1(tmp_path, monkeypatch):
    def fake_run(config, **kwargs):
        if config.lr > 0.05:
            raise RuntimeError("out of memory")
        raise UserInputError("bad input")

    monkeypatch.setattr(experiments.pipeline, "run", fake_run)
    path = tmp_path / "exp.toml"
    path.write_text('data = "x"\nweights = "none"\n[sweep]\nlr = [0.01, 0.1]\n')
    result = experiments.run_experiment(path, out=tmp_path / "out")
    assert [row["error"] for row in result.rows] == ["UserInputError: bad input",
                                                     "RuntimeError: out of memory"]
    assert result.exit_status == 1
    assert "RuntimeError" in (tmp_path / "out" / "errors" / "lr=0.1.txt").read_text()


@pytest.mark.slow
def test_experiment_report_links_each_run_and_escapes_nothing_into_script(experiment):
    import html.parser

    _, out, _ = experiment
    page = (out / "report.html").read_text()
    links = re.findall(r'href="([^"]+)"', page)
    assert sorted(links) == ["lr=0.001/report.html", "lr=0.01/report.html"]
    assert all((out / link).is_file() for link in links)
    assert 'src="plots/results.png"' in page and (out / "plots" / "results.png").is_file()
    script = page[page.index("<script>"):page.index("</script>")]
    assert "lr=0.0" not in script and "broken" not in script  # no run text in the script
    parser = html.parser.HTMLParser()
    parser.feed(page)  # well-formed enough to parse


def test_kept_backbones_come_back_with_their_initial_weights_and_are_bounded():
    """Issue 14: `pipeline.Backbones` hands a kept backbone out as just built, and keeps at
    most `limit` of them."""
    import keras
    import numpy as np

    from tlapp.pipeline import Backbones

    def tiny():
        inputs = keras.Input((4,))
        return keras.Model(inputs, keras.layers.Dense(2)(inputs))

    kept = Backbones(limit=1)
    first, second = tiny(), tiny()
    kept.keep(("a",), first)
    initial = [w.copy() for w in first.get_weights()]
    first.set_weights([w + 1 for w in initial])  # what a run's fine-tuning would do
    assert kept.get(("a",)) is first
    for got, want in zip(first.get_weights(), initial):
        np.testing.assert_array_equal(got, want)
    kept.keep(("b",), second)
    assert kept.get(("a",)) is None and kept.get(("b",)) is second


@pytest.mark.slow
def test_runs_of_an_experiment_build_a_shared_backbone_once(tmp_path, monkeypatch):
    """Issue 14: consecutive runs on one backbone build it once; a run on the kept backbone
    (after a run that fine-tuned it) trains exactly as a run on a new one."""
    import tlapp
    from tlapp.backbones import registry

    data = make_folder(tmp_path / "data", per_class=4)
    common = dict(data=str(data), backbone="mobilenet_v2", weights="none", image_size=32,
                  epochs=2, batch_size=4, cache_dir=str(tmp_path / "cache"))
    path = tmp_path / "exp.toml"
    path.write_text("".join(f'{k} = {json.dumps(v)}\n' for k, v in common.items())
                    + f'out = "{tmp_path / "out"}"\n'
                    '[[runs]]\nname = "tuned"\nfine_tune_epochs = 1\n[[runs]]\nname = "head"\n')
    built = []
    real = registry.build_backbone
    monkeypatch.setattr(registry, "build_backbone",
                        lambda spec, *args, **kw: built.append(spec.name) or real(spec, *args,
                                                                                 **kw))
    assert cli.main(["experiment", str(path)]) == 0
    assert built == ["mobilenet_v2"]
    kept = json.loads((tmp_path / "out" / "head" / "metrics.json").read_text())
    fresh = tlapp.train(**common, out=str(tmp_path / "fresh"), saved_model="off").metrics
    assert built == ["mobilenet_v2"] * 2
    assert kept["val_accuracy"] == fresh["val_accuracy"]
    assert kept["final_epoch"]["loss"] == pytest.approx(fresh["final_epoch"]["loss"], rel=1e-5)
    assert kept["final_epoch"]["val_loss"] == pytest.approx(fresh["final_epoch"]["val_loss"],
                                                            rel=1e-5)
