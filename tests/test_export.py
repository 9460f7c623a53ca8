"""`tlapp export` never deletes or mixes up what a user made, and fails with a message."""
import json
import shutil

import numpy as np
import pytest

from tlapp import cli, files
from tlapp.inference import export

pytestmark = pytest.mark.slow  # every test exports the session's trained run


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_refuses_a_folder_with_the_users_files(trained_run, tmp_path, capsys):
    target = tmp_path / "x"
    (target / "sub").mkdir(parents=True)
    (target / "precious.txt").write_text("p")
    for extra in ([], ["--overwrite"]):
        code, _, err = run_cli(capsys, "export", trained_run.path, "--out", target, *extra)
        assert code == 2 and "does not hold a tlapp SavedModel export" in err
        assert "Traceback" not in err
    assert (target / "precious.txt").read_text() == "p" and (target / "sub").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no .partial left behind


@pytest.mark.parametrize("where", ["run", "dot", "file"])
def test_export_refuses_the_run_itself_the_current_folder_and_files(trained_run, tmp_path,
                                                                     capsys, monkeypatch, where):
    run = tmp_path / "run"
    shutil.copytree(trained_run.path, run)
    before = sorted(p.name for p in run.iterdir())
    target = {"run": run, "dot": ".", "file": run / "config.toml"}[where]
    monkeypatch.chdir(run)
    code, _, err = run_cli(capsys, "export", run, "--out", target, "--overwrite")
    assert code == 2, err
    assert ("is a file" if where == "file" else "does not hold a tlapp") in err
    assert sorted(p.name for p in run.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_previous_export_is_replaced_only_with_overwrite(trained_run, tmp_path, capsys):
    target = tmp_path / "serving" / "1"
    code, _, err = run_cli(capsys, "export", trained_run.path, "--out", target)
    assert code == 0, err
    assert files.owned_kind(target) == "SavedModel export"
    first = (target / "saved_model.pb").stat().st_mtime_ns
    code, _, err = run_cli(capsys, "export", trained_run.path, "--out", target)
    assert code == 2 and "already holds a tlapp SavedModel export" in err and "--overwrite" in err
    assert (target / "saved_model.pb").stat().st_mtime_ns == first
    code, _, err = run_cli(capsys, "export", trained_run.path, "--out", target, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in target.parent.iterdir()) == ["1"]


def test_exports_made_before_markers_are_recognised(trained_run, tmp_path, capsys):
    """A SavedModel export written by tlapp 0.1 (no marker) may be replaced with --overwrite."""
    old = tmp_path / "old"
    shutil.copytree(trained_run.path / "saved_model", old)
    (old / files.MARKER).unlink()
    code, _, err = run_cli(capsys, "export", trained_run.path, "--out", old, "--overwrite")
    assert code == 0, err


def test_a_failed_export_leaves_the_previous_one_and_no_temp(trained_run, tmp_path, capsys,
                                                             monkeypatch):
    target = tmp_path / "sm"
    assert run_cli(capsys, "export", trained_run.path, "--out", target)[0] == 0
    before = sorted(str(p.relative_to(target)) for p in target.rglob("*"))

    def full_disk(obj, path, *args, **kwargs):
        (__import__("pathlib").Path(path)).mkdir(parents=True, exist_ok=True)
        (__import__("pathlib").Path(path) / "half").write_text("x")
        raise OSError("524288 requested and 499648 written")  # numpy's short write

    import tensorflow as tf

    monkeypatch.setattr(tf.saved_model, "save", full_disk)
    code, _, err = run_cli(capsys, "export", trained_run.path, "--out", target, "--overwrite")
    assert code == 2 and "is full" in err and str(tmp_path) in err
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sm"]


def test_tflite_export_is_guarded_too(trained_run, tmp_path, capsys):
    target = tmp_path / "lite"
    target.mkdir()
    (target / "notes.md").write_text("mine")
    code, _, err = run_cli(capsys, "export", trained_run.path, "--format", "tflite", "--out",
                           target, "--overwrite")
    assert code == 2 and "does not hold a tlapp TFLite export" in err
    assert (target / "notes.md").read_text() == "mine"


def test_serving_signatures_answer_an_empty_batch(trained_run):
    import tensorflow as tf

    served = tf.saved_model.load(str(trained_run.path / "saved_model"))
    out = served.signatures["serving_default"](images=tf.constant([], tf.string))
    assert out["probabilities"].shape == (0, 3) and out["class_name"].shape == (0,)
    out = served.signatures["serving_pixels"](pixels=tf.zeros([0, 32, 32, 3]))
    assert out["class_index"].shape == (0,)
    one = served.signatures["serving_pixels"](pixels=tf.zeros([1, 32, 32, 3]))
    np.testing.assert_allclose(one["probabilities"].numpy().sum(), 1.0, atol=1e-5)


def test_write_folder_keeps_the_old_folder_when_writing_fails(tmp_path):
    target = tmp_path / "t"

    def good(temp):
        (temp / "a.txt").write_text("1")

    files.write_folder(target, good, "thing")
    with pytest.raises(RuntimeError):
        files.write_folder(target, lambda temp: (_ for _ in ()).throw(RuntimeError("x")),
                           "thing", overwrite=True)
    assert (target / "a.txt").read_text() == "1"
    assert json.loads((target / files.MARKER).read_text()) == {"kind": "thing"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    assert export.is_old_saved_model_export(tmp_path) is False
