"""Run configuration: one frozen dataclass whose fields carry their default, type and help.

Every field is a flag of `tlapp train` (generated from this file by `tlapp.cli`) and a key of
a TOML config file; `to_toml` writes the fully resolved config of a run.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import typing
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

from tlapp.augment.spec import parse_spec
from tlapp.constants import DEFAULT_MAX_PIXELS
from tlapp.errors import UserInputError

AUTO = "auto"  # lr / fine_tune_lr: chosen by the learning-rate range test


def setting(default: Any, help: str, choices: tuple | None = None, metavar: str | None = None,
            flag: bool = True) -> Any:
    """A Config field with its help text; `choices` are checked by `validate` and listed by
    the CLI; flag=False keeps it off the command line (DATA is positional)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "metavar": metavar, "flag": flag})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run.

    `None` means "resolve a default": `image_size` from the backbone, `cut` from
    `trainable_blocks`, `cache_dir` from the environment, `out` from the time.
    """

    data: str = setting("", "folder with one subfolder per class, or train/ val/ test/, a "
                            "CSV or JSON Lines list of images and labels, or tfds:NAME",
                        flag=False)
    backbone: str = setting("resnet50", "backbone name (see 'tlapp backbones') or PATH.keras")
    weights: str = setting("imagenet", "imagenet, none (random init) or PATH to a weights file; "
                                       "for a .keras backbone, saved (its own weights; "
                                       "imagenet means the same)")
    cut: str | None = setting(None, "layer where the frozen stem ends (see 'tlapp backbones "
                                    "NAME'); 'input' freezes nothing", metavar="LAYER")
    trainable_blocks: int | str | None = setting(
        None, "leave the top N blocks trainable; 0 trains only the head; 'all' trains every "
              "layer on images (default 0; 'all' for lenet5, alexnet)", metavar="N")
    image_size: int | None = setting(None, "square input size in pixels; default: the "
                                           "backbone's own", metavar="N")
    epochs: int = setting(10, "training epochs of stage 1", metavar="N")
    batch_size: int = setting(32, "batch size", metavar="N")
    lr: float | str = setting(1e-3, "learning rate, or auto: run the learning-rate range "
                                    "test first and train with its suggestion (recorded "
                                    "in config.toml)", metavar="X|auto")
    dropout: float = setting(0.2, "dropout before the softmax layer", metavar="X")
    cache: str = setting("on", "on: stage 1 trains on cached activations; off: the frozen stem "
                               "runs on every image every step", choices=("on", "off"))
    aug_views: int = setting(1, "cache K views per image: view 0 plain, views 1..K-1 augmented "
                                "with --augment; training reads a different view each epoch",
                             metavar="K")
    cache_dtype: str = setting("auto", "auto: float16 for spatial activations, float32 for "
                                       "pooled", choices=("auto", "float16", "float32"))
    cache_shard_mb: int = setting(64, "size bound of one cache shard in MiB", metavar="MB")
    optimizer: str = setting("adam", "adam, sgd (momentum 0.9, Nesterov) or adamw",
                             choices=("adam", "sgd", "adamw"))
    weight_decay: float | None = setting(None, "decoupled weight decay of the optimizer "
                                               "(default 1e-4 for adamw, none for adam and "
                                               "sgd)", metavar="X")
    lr_schedule: str = setting("constant", "constant, cosine, plateau (reduce on plateau) or "
                                           "onecycle (lr/25 up to lr, then cosine down to "
                                           "~0)", choices=("constant", "cosine", "plateau",
                                                           "onecycle"))
    warmup_epochs: int = setting(0, "raise the learning rate linearly from 0 over the first "
                                    "N epochs of each stage, then follow the schedule; with "
                                    "onecycle, N epochs of its rise", metavar="N")
    label_smoothing: float = setting(0.0, "label smoothing in [0, 1)", metavar="X")
    early_stopping: int = setting(0, "stop after N epochs without a lower val loss and keep "
                                     "the best weights; 0 = off", metavar="N")
    fine_tune_epochs: int = setting(0, "stage 2: fine-tune deeper on images for N epochs; "
                                       "0 = no stage 2", metavar="N")
    fine_tune_blocks: int = setting(1, "stage 2 unfreezes N more blocks", metavar="N")
    fine_tune_cut: str | None = setting(None, "or: stage 2 unfreezes everything above this "
                                              "layer", metavar="LAYER")
    fine_tune_lr: float | str | None = setting(
        None, "stage 2 learning rate (default lr / 10), or auto: a range test on the "
              "fine-tuning stage picks it", metavar="X|auto")
    bn_trainable: bool = setting(False, "let BatchNormalization layers train (default: "
                                        "frozen, inference mode)")
    mixed_precision: bool = setting(False, "mixed_float16 compute (GPU speed-up; works but "
                                           "slow on CPU)")
    jit: bool = setting(False, "compile training steps with XLA")
    strategy: str = setting("auto", "tf.distribute strategy: auto (mirrored when more than one "
                                    "GPU is visible, else one), one (a single device), mirrored "
                                    "(every local GPU), multi-worker (the machines of TF_CONFIG); "
                                    "--batch-size is the global batch (README 'Scaling out')",
                            choices=("auto", "one", "mirrored", "multi-worker"))
    val_fraction: float = setting(0.1, "fraction of each class held out for validation",
                                  metavar="X")
    test_fraction: float = setting(0.1, "fraction of each class held out for test",
                                   metavar="X")
    path_column: str = setting("path", "a CSV or JSON Lines DATA: the column of image paths "
                                       "(relative to the list's folder, or absolute)",
                               metavar="NAME")
    label_column: str = setting("label", "a CSV or JSON Lines DATA: the column of labels",
                                metavar="NAME")
    label_from: str | None = setting(None, "take each image's label from the first capture "
                                           "group of this regular expression on its path "
                                           "relative to DATA, e.g. '([^/]+)_\\d+\\.jpg$'",
                                     metavar="REGEX")
    group_by: str | None = setting(None, "keep each group in one split; the group is the "
                                         "first capture group of this regular expression "
                                         "on the relative path, e.g. '^(.+?)_nohash_'",
                                   metavar="REGEX")
    multi_label: bool = setting(False, "several labels per image (a CSV cell 'a;b', a JSON "
                                       "Lines list): sigmoid outputs, a decision threshold "
                                       "per label tuned on val")
    cache_dir: str | None = setting(None, "feature cache folder (default $TLAPP_CACHE_DIR, "
                                          "else $XDG_CACHE_HOME/tlapp or ~/.cache/tlapp)",
                                    metavar="DIR")
    out: str | None = setting(None, "run folder to write (default models/BACKBONE-TIME)",
                              metavar="RUN")
    seed: int = setting(0, "random seed", metavar="N")
    augment: str | None = setting(None, "augmentation spec, e.g. flip,crop=0.875,rotate=15,"
                                        "color=20 (README 'Augmentation'); applied to live "
                                        "training and to cached views (--aug-views)",
                                  metavar="SPEC")
    preprocess: str | None = setting(None, "for a .keras backbone: none (default), caffe, tf "
                                           "or torch", metavar="MODE")
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "skip images larger than this many pixels",
                              metavar="N")
    class_weight: str = setting("none", "none, or auto: weight the loss by inverse class "
                                        "frequency", choices=("none", "auto"))
    calibrate: str = setting("on", "on: fit a temperature on the validation split so that "
                                   "probabilities match accuracy (baked into the model and "
                                   "every export); off: raw softmax", choices=("on", "off"))
    reject_below: float | str | None = setting(
        None, "answer 'unknown' when the top probability is below P; auto: choose P on the "
              "validation split so that --keep of its images are kept", metavar="P|auto")
    keep: float = setting(0.95, "with --reject-below auto: the share of in-distribution "
                                "(validation) images to keep", metavar="X")
    track: str = setting("none", "none, or mlflow: log parameters, metrics and artifacts to "
                                 "MLflow ($MLFLOW_TRACKING_URI, else mlruns/ in the current "
                                 "folder; pip install \"tlapp[mlflow]\")",
                         choices=("none", "mlflow"))
    saved_model: str = setting("on", "on: write RUN/saved_model when the run finishes; off: "
                                     "skip it (the runs of 'tlapp experiment' default to off; "
                                     "'tlapp export RUN' writes it later)",
                               choices=("on", "off"))
    gradcam: str = setting("on", "on: report.html overlays Grad-CAM on the test images the "
                                 "model got most confidently wrong; off: the images alone (the "
                                 "runs of 'tlapp experiment' default to off; 'tlapp report RUN' "
                                 "draws them later)", choices=("on", "off"))

    def replace(self, **changes: Any) -> "Config":
        return validate(dataclasses.replace(self, **changes))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


@functools.cache
def field_types(name: str) -> tuple[type, ...]:
    """The types a field accepts, None excluded: (str,), (int,), (int, str) ..."""
    hint = typing.get_type_hints(Config)[name]
    return tuple(t for t in typing.get_args(hint) or (hint,) if t is not type(None))


def from_dict(values: dict[str, Any], source: str = "config") -> Config:
    """Builds a validated Config, rejecting unknown keys and values of the wrong type."""
    clean = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise UserInputError(
                f"{source}: unknown key '{key}'. Valid keys: {', '.join(sorted(FIELDS))}."
            )
        types = field_types(name)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is not None and (not isinstance(value, types)
                                  or (isinstance(value, bool) and bool not in types)):
            wanted = " or ".join(t.__name__ for t in types)
            raise UserInputError(
                f"{source}: '{key}' must be {wanted}. Received: {key}={value!r}"
            )
        clean[name] = value
    return validate(Config(**clean))


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a TOML file; a missing or malformed file is a UserInputError."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise UserInputError(f"Config file not found: {path}") from None
    except IsADirectoryError:
        raise UserInputError(f"{path} is a folder; --config takes a TOML file (e.g. a run's "
                             f"config.toml).") from None
    except OSError as e:
        raise UserInputError(f"Cannot read config file {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path} is not valid TOML: {e}") from None
    return values


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a flat TOML config file into a dict (validated later by `from_dict`)."""
    values = read_toml(path)
    for key, value in values.items():
        if key == "augment" and isinstance(value, dict):
            values[key] = augment_table_to_spec(value, path)
        elif isinstance(value, dict):
            raise UserInputError(f"{path}: tables are not supported yet, except [augment]. "
                                 f"Received: [{key}]")
    return values


def augment_table_to_spec(table: dict[str, Any], source: str | os.PathLike = "config") -> str:
    """An `[augment]` TOML table as a spec string: `op = true` turns an op on with its
    default, `op = 15` or `op = [0.08, 1.0]` gives its values, `op = false` leaves it off."""
    items = []
    for op, value in table.items():
        numbers = value if isinstance(value, list) else [value]
        if value is True:
            items.append(op)
        elif value is not False and numbers and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            items.append(f"{op}=" + ":".join(str(v) for v in numbers))
        elif value is not False:
            raise UserInputError(f"{source}: [augment] {op} must be true, false, a number or a "
                                 f"list of numbers. Received: {op}={value!r}")
    return ",".join(items)


def validate(config: Config) -> Config:
    """Checks ranges; messages name the key and the value received."""

    def check(ok: bool, key: str, rule: str) -> None:
        if not ok:
            value = getattr(config, key)
            raise UserInputError(f"'{key}' must be {rule}. Received: {key}={value!r}")

    check(config.epochs >= 1, "epochs", "at least 1")
    check(config.batch_size >= 1, "batch_size", "at least 1")
    check(is_rate(config.lr), "lr", "a positive number or 'auto'")
    check(0 <= config.dropout < 1, "dropout", "in [0, 1)")
    check(0 <= config.val_fraction < 1, "val_fraction", "in [0, 1)")
    check(0 <= config.test_fraction < 1, "test_fraction", "in [0, 1)")
    check(config.val_fraction + config.test_fraction < 1, "test_fraction",
          "such that val_fraction + test_fraction < 1")
    check(config.image_size is None or config.image_size >= 1, "image_size", "positive")
    check(config.max_pixels >= 1, "max_pixels", "at least 1")
    check(config.trainable_blocks in (None, "all") or (
        isinstance(config.trainable_blocks, int) and config.trainable_blocks >= 0),
        "trainable_blocks", "0 or more, or 'all'")
    for name, field in FIELDS.items():
        choices = field.metadata["choices"]
        if choices:
            check(getattr(config, name) in choices, name, "one of " + ", ".join(choices))
    check(0 <= config.label_smoothing < 1, "label_smoothing", "in [0, 1)")
    check(config.aug_views >= 1, "aug_views", "at least 1")
    check(config.aug_views == 1 or config.augment is not None, "aug_views",
          "1 unless an augmentation spec is given (--augment)")
    check(config.cache_shard_mb >= 1, "cache_shard_mb", "at least 1")
    check(config.early_stopping >= 0, "early_stopping", "0 (off) or more")
    check(config.fine_tune_epochs >= 0, "fine_tune_epochs", "0 or more")
    check(config.fine_tune_blocks >= 1, "fine_tune_blocks", "at least 1")
    check(config.fine_tune_lr is None or is_rate(config.fine_tune_lr), "fine_tune_lr",
          "a positive number or 'auto'")
    check(config.warmup_epochs >= 0, "warmup_epochs", "0 (off) or more")
    check(config.weight_decay is None or config.weight_decay >= 0, "weight_decay",
          "0 or more")
    if config.trainable_blocks == "all" and config.fine_tune_epochs:
        raise UserInputError("trainable_blocks='all' already trains every layer; fine-tuning "
                             f"has nothing to unfreeze. Received: fine_tune_epochs="
                             f"{config.fine_tune_epochs}")
    if config.cut is not None and config.trainable_blocks not in (None, 0):
        raise UserInputError(
            "Give either cut or trainable_blocks, not both. "
            f"Received: cut={config.cut!r}, trainable_blocks={config.trainable_blocks}"
        )
    check(config.reject_below in (None, "auto") or (
        isinstance(config.reject_below, float) and 0 <= config.reject_below <= 1),
        "reject_below", "a probability in [0, 1], or 'auto'")
    check(0 < config.keep <= 1, "keep", "in (0, 1]")
    if config.multi_label and config.reject_below is not None:
        raise UserInputError(f"reject_below applies to one label per image; a multi-label run "
                             f"already answers 'none' when no label reaches its threshold. "
                             f"Received: reject_below={config.reject_below!r}")
    if config.multi_label and config.class_weight != "none":
        raise UserInputError(f"class_weight balances one label per image; with multi_label "
                             f"every label is its own yes/no decision. Received: "
                             f"class_weight={config.class_weight!r} with multi_label=True")
    if config.augment is not None:  # stored in canonical form, every value explicit
        config = dataclasses.replace(config, augment=str(parse_spec(config.augment)) or None)
    return config


def is_rate(value: Any) -> bool:
    """A learning rate setting: a positive number, or "auto" (the range test picks it)."""
    if isinstance(value, str):
        return value == AUTO
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def to_toml(config: Config) -> str:
    """Writes the config as TOML that `load_toml` reads back to the same Config."""
    lines = ["# tlapp run configuration (fully resolved); rerun with: tlapp train --config FILE"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in config.to_dict().items()]
    return "\n".join(lines) + "\n"


def default_cache_dir() -> Path:
    """$TLAPP_CACHE_DIR, else $XDG_CACHE_HOME/tlapp, else ~/.cache/tlapp."""
    if os.environ.get("TLAPP_CACHE_DIR"):
        return Path(os.environ["TLAPP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tlapp"
