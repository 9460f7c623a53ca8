import configparser
import gc
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import make_folder
from tlapp import cli


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case, message", [
    ("unknown_backbone", "Unknown backbone. Received: backbone='resnet51'"),
    ("invalid_cut", "not a valid cut point of vgg16"),
    ("missing_folder", "Data folder not found"),
    ("one_class", "1 class folder"),
    ("offline_imagenet", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ("bad_value", "epochs=0"),
    ("missing_config", "Config file not found"),
])
def test_bad_usage_exits_2_with_a_message(tmp_path, capsys, case, message):
    data = make_folder(tmp_path / "data", per_class=3,
                       classes={"cat": 0} if case == "one_class" else {"cat": 0, "dog": 0.3})
    args = ["train", data, "--backbone", "vgg16", "--weights", "none", "--image-size", 32,
            "--epochs", 1, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run"]
    args += {
        "unknown_backbone": ["--backbone", "resnet51"],
        "invalid_cut": ["--cut", "block4_conv9"],
        "missing_folder": [],
        "one_class": [],
        "offline_imagenet": ["--weights", "imagenet"],
        "bad_value": ["--epochs", 0],
        "missing_config": ["--config", tmp_path / "nope.toml"],
    }[case]
    if case == "missing_folder":
        args[1] = tmp_path / "nowhere"
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err + out
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_console_script_exit_status_and_message(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tlapp", "train", str(tmp_path / "nowhere")],
                            capture_output=True, text=True, env=os.environ | {"CI": "1"})
    assert result.returncode == 2
    assert "error: Data folder not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_command_in_its_own_process_freezes_what_lives_as_long_as_the_process(
        monkeypatch):
    """`tlapp` (and `python -m tlapp`) is `cli.run`: main() told that the process is its
    own (it freezes the objects alive once TensorFlow has started), then gc.freeze() so that
    the interpreter's exit does not collect over every TensorFlow object (0.7-1.5 s)."""
    seen = {}

    def main(argv=None, own_process=False):
        seen.update(own_process=own_process, frozen_before=gc.get_freeze_count())
        return 3

    monkeypatch.setattr(cli, "main", main)
    try:
        assert cli.run() == 3
        assert seen == {"own_process": True, "frozen_before": 0}
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    setup = configparser.ConfigParser()
    setup.read(os.path.join(os.path.dirname(__file__), "..", "setup.cfg"))
    assert setup["options.entry_points"]["console_scripts"].split() == [
        "tlapp", "=", "tlapp.cli:run"]


def test_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "tlapp", "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0
    for command in ("train", "evaluate", "predict", "export", "experiment", "backbones", "demo"):
        assert command in result.stdout


@pytest.mark.slow
def test_toml_config_with_flag_overrides(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=4)
    config = tmp_path / "run.toml"
    config.write_text(f'data = "{data}"\nbackbone = "vgg16"\nweights = "none"\n'
                      f'image_size = 32\nepochs = 3\nbatch_size = 4\n'
                      f'cache_dir = "{tmp_path / "cache"}"\n')
    code, out, err = run_cli(capsys, "train", "--config", config, "--epochs", 2,
                             "--trainable-blocks", 1, "--out", tmp_path / "run")
    assert code == 0, err
    written = (tmp_path / "run" / "config.toml").read_text()
    assert "epochs = 2" in written and 'cut = "block4_pool"' in written
    assert "batch_size = 4" in written
    assert len((tmp_path / "run" / "history.csv").read_text().splitlines()) == 3


@pytest.mark.slow
def test_predict_reports_unreadable_files(trained_run, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    good = next((trained_run.path.parent / "data" / "cat").iterdir())
    code, out, _ = run_cli(capsys, "predict", good, bad, "--model", trained_run.path, "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert lines[0]["path"] == str(good) and len(lines[0]["predictions"]) == 3
    assert lines[1]["path"] == str(bad) and lines[1]["error"].startswith("cannot decode")
    code, _, err = run_cli(capsys, "predict", bad, "--model", trained_run.path)
    assert code == 2 and "none of the inputs" in err


def test_predict_with_a_folder_that_is_not_a_run(tmp_path, capsys):
    code, _, err = run_cli(capsys, "predict", "x.jpg", "--model", tmp_path)
    assert code == 2 and "not a tlapp run folder" in err


def test_backbones_table_for_one_backbone(capsys):
    code, out, _ = run_cli(capsys, "backbones", "resnet50", "--image-size", 64)
    assert code == 0
    assert "conv4_block6_out" in out and "4x4x1024" in out and "65,536" in out
    line = next(l for l in out.splitlines() if l.startswith("conv5_block3_out"))
    assert "8,192" in line  # the final layer is cached pooled: 2048 float32


@pytest.mark.slow  # builds all 42 backbones (their shapes only)
def test_backbones_table_lists_the_registry(capsys):
    from tlapp.backbones import registry

    code, out, _ = run_cli(capsys, "backbones")
    assert code == 0
    assert "23,587,712" in out  # ResNet50 without its top
    assert "14,714,688" in out  # VGG16 without its top
    assert len(out.splitlines()) == 1 + len(registry.BACKBONES) + 1  # header, rows, footnote
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:-1]}
    assert rows["vgg16"][2:5] == ["15.3", "G", "224"]  # MACs per image at 224x224, no top
    assert rows["lenet5"][1:5] == ["61,156", "651", "k", "32"]
    assert rows["alexnet"][2:5] == ["720", "M", "227"]
    assert rows["mobilenet_v2"][-1] == "collapses" and rows["resnet50"][-1] == "caffe"


@pytest.mark.slow
def test_demo_runs_offline_end_to_end(tmp_path, caplog):
    from tlapp import demo

    caplog.set_level("INFO", "tlapp")
    run = demo.run_demo(tmp_path / "demo", cache_dir=str(tmp_path / "cache"), epochs=15)
    out = "\n".join(caplog.messages)
    assert "could not be downloaded; continuing with random initialisation" in out
    assert run.metrics["test_accuracy"] > 0.6  # chance is 0.25
    assert "reloaded in a fresh Python process" in out
    assert sum(f"-> {kind}" in out for kind in demo.CLASSES) >= 3


def test_version():
    import tlapp

    result = subprocess.run([sys.executable, "-m", "tlapp", "--version"], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == f"tlapp {tlapp.__version__}"


def test_train_flags_come_from_the_config_fields():
    from tlapp import config as config_lib

    train = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["train"]
    flags = {a.dest: a for a in train._actions}
    for name, field in config_lib.FIELDS.items():
        assert name in flags, name
        if field.metadata["flag"]:
            assert field.metadata["help"] in flags[name].help
            assert flags[name].default is None  # only given flags override a --config file
    assert flags["optimizer"].metavar == "{adam,sgd,adamw}"
    assert "(default 0.001)" in flags["lr"].help and "(default 200000000)" in flags["max_pixels"].help
    args = cli.build_parser().parse_args(["train", "x", "--no-bn-trainable", "--lr", "0.5"])
    assert args.bn_trainable is False and args.lr == 0.5 and args.epochs is None


def test_backbone_table_is_kept_and_then_needs_no_tensorflow(tmp_path, capsys, monkeypatch):
    from tlapp.backbones import registry

    assert cli.main(["backbones", "vgg16", "--image-size", "32", "--cache-dir",
                     str(tmp_path)]) == 0
    first = capsys.readouterr().out

    def no_building(*args, **kwargs):
        raise AssertionError("the kept table was built again")

    monkeypatch.setattr(registry, "build_backbone", no_building)
    assert cli.main(["backbones", "vgg16", "--image-size", "32", "--cache-dir",
                     str(tmp_path)]) == 0
    assert capsys.readouterr().out == first
    code = ("import sys; from tlapp import cli; "
            f"code = cli.main(['backbones', 'vgg16', '--image-size', '32', '--cache-dir', {str(tmp_path)!r}]); "
            "print(code, 'tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.splitlines()[-1] == "0 False"


def test_quiet_hides_progress_and_info(tmp_path, capsys):
    from tlapp import progress

    assert cli.main(["-q", "cache", "list", "--cache-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "0 entries" in out and err == ""
    assert progress.enabled()  # restored after the command


def test_each_message_is_logged_once_even_when_the_root_logger_has_a_handler(tmp_path, capsys):
    import logging

    root = logging.getLogger()
    extra = logging.StreamHandler(sys.stderr)  # as absl installs during a SavedModel export
    root.addHandler(extra)
    try:
        assert cli.main(["cache", "clear", "--all", "--cache-dir", str(tmp_path)]) == 0
        assert cli.main(["cache", "verify", "nope", "--cache-dir", str(tmp_path)]) == 2
    finally:
        root.removeHandler(extra)
    assert capsys.readouterr().err.count("No cache entry named nope") == 1


# --- every failure ends in a message (hardening) ------------------------------------------------

def copy_run(trained_run, tmp_path):
    import shutil

    shutil.copytree(trained_run.path, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    ("truncated_model", "Cannot read"),
    ("short_labels", "lists 2 classes but the model"),
    ("long_labels", "lists 4 classes but the model"),
])
def test_damaged_run_folders_are_messages(trained_run, tmp_path, capsys, damage, message):
    run = copy_run(trained_run, tmp_path)
    if damage == "truncated_model":
        data = (run / "model.keras").read_bytes()
        (run / "model.keras").write_bytes(data[:len(data) // 2])
    else:
        labels = trained_run.labels[:2] if damage == "short_labels" else \
            trained_run.labels + ["extra"]
        (run / "labels.txt").write_text("\n".join(labels) + "\n")
    image = next((trained_run.path.parent / "data" / "cat").iterdir())
    code, out, err = run_cli(capsys, "predict", image, "--model", run)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("split", ["missing", "corrupt"])
def test_evaluate_without_a_readable_split_is_a_message(trained_run, tmp_path, capsys, split):
    run = copy_run(trained_run, tmp_path)
    if split == "missing":
        (run / "split.json").unlink()
    else:
        (run / "split.json").write_text("{not json")
    code, _, err = run_cli(capsys, "evaluate", run)
    assert code == 2 and "split.json" in err and "--data DIR" in err and "Traceback" not in err


@pytest.mark.slow
def test_evaluate_out_never_mixes_with_other_folders(trained_run, tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "metrics.json").write_text('{"f1": 0.3}')
    code, _, err = run_cli(capsys, "evaluate", trained_run.path, "--out", theirs)
    assert code == 2 and "tlapp did not write" in err
    assert (theirs / "metrics.json").read_text() == '{"f1": 0.3}'
    other = copy_run(trained_run, tmp_path)
    before = (other / "metrics.json").read_text()
    code, _, err = run_cli(capsys, "evaluate", trained_run.path, "--out", other)
    assert code == 2 and "another run's folder" in err
    assert (other / "metrics.json").read_text() == before
    code, _, err = run_cli(capsys, "evaluate", trained_run.path, "--out", tmp_path / "new")
    assert code == 0, err
    code, _, err = run_cli(capsys, "evaluate", trained_run.path, "--out", tmp_path / "new")
    assert code == 0, err  # its own earlier evaluation is replaced


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "batch_size must be a whole number of at least 1"),
    (["--top-k", "0"], "top_k must be at least 1"),
    (["--top-k", "-1"], "top_k must be at least 1"),
])
def test_predict_option_errors(trained_run, capsys, args, message):
    image = next((trained_run.path.parent / "data" / "cat").iterdir())
    code, _, err = run_cli(capsys, "predict", image, "--model", trained_run.path, *args)
    assert code == 2 and message in err


@pytest.mark.slow
def test_inputs_that_yield_nothing_are_reported_not_dropped(trained_run, tmp_path, capsys):
    image = next((trained_run.path.parent / "data" / "cat").iterdir())
    (tmp_path / "empty").mkdir()
    code, out, _ = run_cli(capsys, "predict", image, tmp_path / "nope*.jpg", tmp_path / "empty",
                           "--model", trained_run.path, "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == 3
    assert lines[1] == {"path": str(tmp_path / "nope*.jpg"),
                        "error": "no file matches this pattern"}
    assert lines[2]["error"].startswith("a folder with no images")


def test_config_naming_a_folder_is_a_message(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--config", tmp_path)
    assert code == 2 and "is a folder; --config takes a TOML file" in err


def test_cache_command_arguments_are_checked(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, "cache", "list", "--cache-dir", tmp_path / "file")
    assert code == 2 and "is a file; --cache-dir takes the cache folder" in err
    code, _, err = run_cli(capsys, "cache", "clear", "--older-than", "-5", "--cache-dir",
                           tmp_path)
    assert code == 2 and "--older-than takes a number of days, 0 or more" in err


def test_misspelt_cut_is_answered_by_name_similarity():
    from tlapp.backbones import cuts, registry
    from tlapp.errors import UserInputError

    spec = registry.get_spec("resnet50")
    model = registry.build_backbone(spec, "none", 32)
    with pytest.raises(UserInputError) as error:
        cuts.resolve_cut(spec, model, "conv2_blok1_out", None)
    assert "Did you mean conv2_block1_out?" in str(error.value)
    assert "conv5_block1_out" not in str(error.value)
    with pytest.raises(UserInputError) as error:
        cuts.resolve_cut(spec, model, "conv3_block2_1_conv", None)
    assert "nearest cut points are conv3_block1_out and conv3_block2_add" in str(error.value)


def test_demo_never_trains_on_or_replaces_the_users_folders(tmp_path, capsys):
    (tmp_path / "a" / "data" / "holiday").mkdir(parents=True)
    (tmp_path / "a" / "data" / "holiday" / "me.jpg").write_bytes(b"x")
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path / "a")
    assert code == 2 and "does not hold the demo's images" in err
    (tmp_path / "b" / "run").mkdir(parents=True)
    (tmp_path / "b" / "run" / "notes.txt").write_text("n")
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path / "b")
    assert code == 2 and "is not a tlapp run" in err
    assert (tmp_path / "a" / "data" / "holiday" / "me.jpg").read_bytes() == b"x"
    assert (tmp_path / "b" / "run" / "notes.txt").read_text() == "n"
    assert not (tmp_path / "b" / "data").exists()


def test_a_full_disk_anywhere_is_exit_2_not_a_traceback(tmp_path, capsys, monkeypatch):
    def full(args):
        raise OSError("1048576 requested and 12 written")  # numpy's short write: no errno

    parser = cli.build_parser()
    parser._subparsers._group_actions[0].choices["cache"].set_defaults(func=full)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    code, _, err = run_cli(capsys, "cache", "list", "--cache-dir", tmp_path)
    assert code == 2 and "the disk is full" in err and "Traceback" not in err


def test_optional_imports_are_skipped_only_inside_the_block(tmp_path, monkeypatch):
    """Issue 14: while TensorFlow starts, Keras's optional imports find nothing (as if not
    installed); afterwards the same modules import as usual."""
    from tlapp.cli.startup import optional_imports_skipped

    (tmp_path / "tlapp_optional_probe.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tlapp_optional_probe", raising=False)
    with optional_imports_skipped(("tlapp_optional_probe",)):
        with pytest.raises(ImportError):
            import tlapp_optional_probe  # noqa: F401
    import tlapp_optional_probe

    assert tlapp_optional_probe.VALUE == 1
    monkeypatch.delitem(sys.modules, "tlapp_optional_probe")


@pytest.mark.slow
def test_tensorflow_starts_without_keras_optional_imports():
    """Issue 14: the CLI's start of TensorFlow does not import scikit-learn, pandas or pyplot
    (a second or more of every command); they still import afterwards."""
    code = ("import sys\nfrom tlapp.cli.startup import SKIPPED_AT_START, start_tensorflow\n"
            "start_tensorflow(False)\nimport keras\n"
            "print(sorted(n for n in SKIPPED_AT_START if n in sys.modules))\n"
            "import importlib, importlib.util\n"  # those installed import afterwards
            "[importlib.import_module(n) for n in SKIPPED_AT_START\n"
            " if importlib.util.find_spec(n.split('.')[0])]\nprint('imported')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "imported"]
