"""The [search] table of an experiment file: options and parameter ranges, checked up front.

    [search]
    method = "bayes"                 # random | bayes (Optuna's TPE)
    trials = 20                      # finished trials wanted (pruned ones count)
    startup_trials = 6               # random trials before TPE (default trials // 3, 2..10)
    multivariate = true              # TPE models the parameters jointly (default true)
    lr = { log = [1e-4, 1e-1] }      # log-uniform
    dropout = { linear = [0.0, 0.5] }
    optimizer = { choice = ["adam", "adamw", "sgd"] }
    batch_size = { choice = [16, 32, 64] }

Integer settings (batch_size, trainable_blocks, aug_views, warmup_epochs) draw integers
from a log or linear range. Every bound and choice is checked against the base settings
before any training, so a bad range fails at once, naming its key.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from tlapp import config as config_lib
from tlapp.errors import UserInputError

METHODS = ("random", "bayes")
KINDS = ("log", "linear", "choice")
SEARCHABLE = ("lr", "dropout", "label_smoothing", "optimizer", "weight_decay", "batch_size",
              "trainable_blocks", "aug_views", "lr_schedule", "warmup_epochs", "fine_tune_lr")
OPTIONS = ("method", "trials", "prune", "sampler_seed", "startup_trials", "multivariate")


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched setting: a log or linear range (integers for integer settings), or
    a list of choices."""

    name: str
    kind: str  # log | linear | choice
    values: tuple  # (low, high) for ranges, the choices otherwise
    integer: bool = False

    def suggest(self, trial) -> Any:
        """The value an Optuna trial draws (or was given, for an enqueued retry)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.values))
        low, high = self.values
        if self.integer:
            return trial.suggest_int(self.name, low, high, log=self.kind == "log")
        return trial.suggest_float(self.name, low, high, log=self.kind == "log")

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name} in {list(self.values)}"
        return f"{self.name} {self.kind} [{self.values[0]}, {self.values[1]}]"


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    method: str
    trials: int
    prune: bool
    sampler_seed: int
    startup_trials: int  # random trials before TPE models the results (and the pruner acts)
    params: tuple[Param, ...]
    multivariate: bool = True  # TPE models the parameters jointly (Optuna's multivariate TPE)

    def fingerprint(self) -> str:
        """What a resumed study compares to notice that the file changed."""
        values = dataclasses.asdict(self) | {"trials": None}
        if self.multivariate:  # the default: a study started before the option resumes quietly
            del values["multivariate"]
        return json.dumps(values, sort_keys=True)


def parse_search(table: Any, base: dict, where: str) -> SearchSpec:
    """Checks a [search] table against the base settings `base` (a dict of Config keys).

    Raises:
        UserInputError: an unknown option, method or parameter, a malformed or empty range,
            a value the Config rejects, or a setting both fixed and searched; the message
            names the key.
    """
    if not isinstance(table, dict):
        raise UserInputError(f"{where}: 'search' must be a table ([search]). "
                             f"Received: search={table!r}")
    where = f"{where} [search]"
    table = {key.replace("-", "_"): value for key, value in table.items()}
    method = table.get("method", "bayes")
    if method not in METHODS:
        raise UserInputError(f"{where}: 'method' must be one of {', '.join(METHODS)}. "
                             f"Received: method={method!r}")
    trials = _integer(table, "trials", 20, 1, where)
    startup = _integer(table, "startup_trials", max(2, min(10, trials // 3)), 1, where)
    seed = _integer(table, "sampler_seed", int(base.get("seed", 0)), 0, where)
    prune, multivariate = (_boolean(table, key, where) for key in ("prune", "multivariate"))
    params = tuple(_param(name, value, base, where) for name, value in table.items()
                   if name not in OPTIONS)
    if not params:
        raise UserInputError(f"{where}: no parameter to search. Give ranges such as "
                             f"lr = {{ log = [1e-4, 1e-1] }}; searchable: "
                             f"{', '.join(SEARCHABLE)}.")
    return SearchSpec(method, trials, prune, seed, startup, params, multivariate)


def _boolean(table: dict, key: str, where: str, default: bool = True) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise UserInputError(f"{where}: '{key}' must be true or false. Received: {key}="
                             f"{value!r}")
    return value


def _integer(table: dict, key: str, default: int, minimum: int, where: str) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserInputError(f"{where}: '{key}' must be an integer of at least {minimum}. "
                             f"Received: {key}={value!r}")
    return value


def _param(name: str, spec: Any, base: dict, where: str) -> Param:
    if name not in SEARCHABLE:
        hint = f"; {name} is a Config key: set it as a base setting" \
            if name in config_lib.FIELDS else ""
        raise UserInputError(f"{where}: unknown parameter or option '{name}'. Options: "
                             f"{', '.join(OPTIONS)}; searchable settings: "
                             f"{', '.join(SEARCHABLE)}{hint}.")
    if name in base:
        raise UserInputError(f"{where}: '{name}' is both a base setting ({name} = "
                             f"{base[name]!r}) and searched; remove one.")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise UserInputError(f"{where}: '{name}' must be a table with one of "
                             f"{', '.join(KINDS)}, e.g. {name} = {{ linear = [a, b] }} or "
                             f"{name} = {{ choice = [x, y] }}. Received: {name}={spec!r}")
    kind, values = next(iter(spec.items()))
    integer = config_lib.field_types(name)[0] is int
    if kind == "choice":
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (str, int, float, bool)) for v in values):
            raise UserInputError(f"{where}: '{name}' choice must be a non-empty list of "
                                 f"numbers or strings. Received: {name}={spec!r}")
        candidates = values
    else:
        numbers = isinstance(values, list) and len(values) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not numbers or not values[0] < values[1]:
            raise UserInputError(f"{where}: '{name}' {kind} must be [low, high] with low < "
                                 f"high. Received: {name}={spec!r}")
        if kind == "log" and values[0] <= 0:
            raise UserInputError(f"{where}: '{name}' log range must be positive. "
                                 f"Received: {name}={spec!r}")
        if integer and not all(isinstance(v, int) for v in values):
            raise UserInputError(f"{where}: '{name}' takes integers. Received: {name}={spec!r}")
        candidates = values
    for value in candidates:  # the Config's own checks, on every bound and choice
        try:
            config_lib.from_dict(base | {name: value}, where)
        except UserInputError as e:
            raise UserInputError(f"{where}: '{name}' = {value!r} is not a valid setting: "
                                 f"{e}") from None
    return Param(name, kind, tuple(values), integer and kind != "choice")
