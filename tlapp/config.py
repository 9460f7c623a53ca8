"""Run configuration: one frozen dataclass, TOML loading and writing, validation.

Every CLI flag of `tlapp train` is a field here, so a TOML file can set it too.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib


class UserInputError(ValueError):
    """Bad usage or bad input: the CLI prints the message and exits with status 2."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run.

    `None` means "resolve a default": `image_size` from the backbone, `cut` from
    `trainable_blocks`, `cache_dir` from the environment, `out` from the time.
    """

    data: str = ""
    backbone: str = "resnet50"
    weights: str = "imagenet"  # imagenet | none | PATH to a weights file (| saved: .keras)
    cut: str | None = None  # layer name; the stem ends here ("input": nothing frozen)
    trainable_blocks: int | str | None = None  # top blocks left trainable; 0 = head; "all"
    image_size: int | None = None
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    dropout: float = 0.2
    cache: str = "on"  # on: train stage 1 on cached activations; off: run the stem every step
    aug_views: int = 1  # cached views per image: view 0 plain, views 1.. augmented
    cache_dtype: str = "auto"  # auto: float16 for spatial activations, float32 for pooled
    cache_shard_mb: int = 64  # size bound of one cache shard
    optimizer: str = "adam"  # adam | sgd (momentum 0.9, Nesterov) | adamw
    lr_schedule: str = "constant"  # constant | cosine | plateau
    label_smoothing: float = 0.0
    early_stopping: int = 0  # patience in epochs on validation loss; 0 = off
    fine_tune_epochs: int = 0  # stage 2: epochs of live fine-tuning; 0 = no stage 2
    fine_tune_blocks: int = 1  # stage 2 unfreezes this many more blocks
    fine_tune_cut: str | None = None  # or: stage 2 unfreezes everything above this layer
    fine_tune_lr: float | None = None  # default: lr / 10
    bn_trainable: bool = False  # BatchNormalization layers train (batch statistics)
    mixed_precision: bool = False
    jit: bool = False
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    cache_dir: str | None = None
    out: str | None = None
    seed: int = 0
    augment: str | None = None  # e.g. "flip,crop=0.875,rotate=15"; see augment_spec.OPS
    preprocess: str | None = None  # none | caffe | tf | torch; for .keras backbones only
    max_pixels: int = 200_000_000  # larger images (decompression bombs) are skipped
    class_weight: str = "none"  # none | auto: weight the loss by inverse class frequency

    def replace(self, **changes: Any) -> "Config":
        return validate(dataclasses.replace(self, **changes))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
CHOICES = {"cache": ("on", "off"), "cache_dtype": ("auto", "float16", "float32"), "optimizer": ("adam", "sgd", "adamw"),
           "lr_schedule": ("constant", "cosine", "plateau")}


def _field_type(name: str) -> type:
    return _TYPES[FIELDS[name].type.split(" |")[0]]


def from_dict(values: dict[str, Any], source: str = "config") -> Config:
    """Builds a validated Config, rejecting unknown keys and values of the wrong type."""
    clean = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise UserInputError(
                f"{source}: unknown key '{key}'. Valid keys: {', '.join(sorted(FIELDS))}."
            )
        want = _field_type(name)
        if name == "trainable_blocks" and value == "all":
            want = str
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if name == "trainable_blocks" and value == "all":
            want = str
        if value is not None and (not isinstance(value, want)
                                  or (isinstance(value, bool) and want is not bool)):
            raise UserInputError(
                f"{source}: '{key}' must be {want.__name__}. Received: {key}={value!r}"
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
    except tomllib.TOMLDecodeError as e:
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
    check(config.lr > 0, "lr", "positive")
    check(0 <= config.dropout < 1, "dropout", "in [0, 1)")
    check(0 <= config.val_fraction < 1, "val_fraction", "in [0, 1)")
    check(0 <= config.test_fraction < 1, "test_fraction", "in [0, 1)")
    check(config.val_fraction + config.test_fraction < 1, "test_fraction",
          "such that val_fraction + test_fraction < 1")
    check(config.image_size is None or config.image_size >= 1, "image_size", "positive")
    check(config.max_pixels >= 1, "max_pixels", "at least 1")
    check(config.class_weight in ("none", "auto"), "class_weight", "'none' or 'auto'")
    check(config.trainable_blocks in (None, "all") or (
        isinstance(config.trainable_blocks, int) and config.trainable_blocks >= 0),
        "trainable_blocks", "0 or more, or 'all'")
    for key, choices in CHOICES.items():
        check(getattr(config, key) in choices, key, "one of " + ", ".join(choices))
    check(0 <= config.label_smoothing < 1, "label_smoothing", "in [0, 1)")
    check(config.aug_views >= 1, "aug_views", "at least 1")
    check(config.aug_views == 1 or config.augment is not None, "aug_views",
          "1 unless an augmentation spec is given (--augment)")
    check(config.cache_shard_mb >= 1, "cache_shard_mb", "at least 1")
    check(config.early_stopping >= 0, "early_stopping", "0 (off) or more")
    check(config.fine_tune_epochs >= 0, "fine_tune_epochs", "0 or more")
    check(config.fine_tune_blocks >= 1, "fine_tune_blocks", "at least 1")
    check(config.fine_tune_lr is None or config.fine_tune_lr > 0, "fine_tune_lr", "positive")
    if config.trainable_blocks == "all" and config.fine_tune_epochs:
        raise UserInputError("trainable_blocks='all' already trains every layer; fine-tuning "
                             f"has nothing to unfreeze. Received: fine_tune_epochs="
                             f"{config.fine_tune_epochs}")
    if config.cut is not None and config.trainable_blocks not in (None, 0):
        raise UserInputError(
            "Give either cut or trainable_blocks, not both. "
            f"Received: cut={config.cut!r}, trainable_blocks={config.trainable_blocks}"
        )
    if config.augment is not None:  # stored in canonical form, every value explicit
        from tlapp.augment_spec import parse_spec  # imported here: it imports this module

        config = dataclasses.replace(config, augment=str(parse_spec(config.augment)) or None)
    return config


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
