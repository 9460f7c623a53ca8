"""Run configuration: one frozen dataclass, TOML loading and writing, validation.

Every CLI flag of `tlapp train` is a field here, so a TOML file can set it too.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any


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
    weights: str = "imagenet"  # imagenet | none | PATH to a weights file
    cut: str | None = None  # layer name; the stem ends here
    trainable_blocks: int | None = None  # top blocks left trainable; 0 = head only
    image_size: int | None = None
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    dropout: float = 0.2
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    cache_dir: str | None = None
    out: str | None = None
    seed: int = 0
    max_pixels: int = 200_000_000  # larger images (decompression bombs) are skipped
    class_weight: str = "none"  # none | auto: weight the loss by inverse class frequency

    def replace(self, **changes: Any) -> "Config":
        return validate(dataclasses.replace(self, **changes))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = {"str": str, "int": int, "float": float}


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
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is not None and (not isinstance(value, want) or isinstance(value, bool)):
            raise UserInputError(
                f"{source}: '{key}' must be {want.__name__}. Received: {key}={value!r}"
            )
        clean[name] = value
    return validate(Config(**clean))


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a flat TOML config file into a dict (validated later by `from_dict`)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise UserInputError(f"Config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserInputError(f"{path} is not valid TOML: {e}") from None
    for key, value in values.items():
        if isinstance(value, dict):
            raise UserInputError(f"{path}: tables are not supported yet. Received: [{key}]")
    return values


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
    check(config.trainable_blocks is None or config.trainable_blocks >= 0,
          "trainable_blocks", "0 or more")
    if config.cut is not None and config.trainable_blocks:
        raise UserInputError(
            "Give either cut or trainable_blocks, not both. "
            f"Received: cut={config.cut!r}, trainable_blocks={config.trainable_blocks}"
        )
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
