"""Checkpoints after every epoch, so an interrupted run resumes exactly where it stopped.

Each save is a whole folder, `checkpoints/save-NNNNNN/` (weights, optimizer state, the
history, the state of early stopping and reduce-on-plateau), written under a temporary name
and renamed when complete; then `checkpoints/current` is replaced atomically with its name.
A kill at any moment leaves `current` naming one complete, consistent checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import keras
import numpy as np

from tlapp.files import write_text

HISTORY_FIELDS = ["epoch", "stage", "loss", "accuracy", "val_loss", "val_accuracy", "lr"]
# Fault injection for tests: "SAVE:STEP" kills this process with SIGKILL in the SAVE-th save,
# after STEP of its steps (1 weights, 2 optimizer, 3 callbacks, 4 state, 5 folder renamed,
# 6 `current` switched, 7 older saves removed).
FAULT_VARIABLE = "TLAPP_KILL_IN_CHECKPOINT"
# What early stopping and reduce-on-plateau must remember across a resume.
CALLBACK_STATE = {"early_stopping": ("wait", "stopped_epoch", "best", "best_epoch"),
                  "plateau": ("wait", "best", "cooldown_counter")}


class _Resumable:
    """Re-applies attributes saved in a checkpoint after Keras resets them in on_train_begin."""

    restored: dict | None = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        for name, value in (self.restored or {}).items():
            setattr(self, name, value)


class EarlyStopping(_Resumable, keras.callbacks.EarlyStopping):
    """keras EarlyStopping whose counters and best weights survive --resume."""


class ReduceLROnPlateau(_Resumable, keras.callbacks.ReduceLROnPlateau):
    """keras ReduceLROnPlateau whose counters survive --resume."""


class Checkpoint(keras.callbacks.Callback):
    """After every epoch: the weights, the optimizer state, the history so far and the state of
    the tracked callbacks, as one folder made current by an atomic switch.

    Args:
        folder: RUN/checkpoints.
        full_model: the whole model (a stage on cached features saves only its own model).
    """

    def __init__(self, folder: Path, full_model: keras.Model):
        super().__init__()
        self.folder = Path(folder)
        self.full_model = full_model
        self.state = {"stage": None, "epoch": 0, "history": [], "finished": [], "saves": 0}
        self.current = self._find_current()
        if self.current is not None:
            self.state = self.state | json.loads((self.current / "state.json").read_text())
        self.restore_pending = bool(self.state["history"])
        self.stage = None
        self.tracked: dict[str, keras.callbacks.Callback] = {}

    def _find_current(self) -> Path | None:
        pointer = self.folder / "current"
        if pointer.is_file():
            return self.folder / pointer.read_text().strip()
        if (self.folder / "state.json").is_file():  # written by tlapp 0.1 (one flat folder)
            return self.folder
        return None

    def completed(self, stage: str, epochs: int) -> int:
        """Epochs of `stage` already done in the checkpoint (all of them once it finished,
        early stopping included)."""
        if stage in self.state["finished"]:
            return epochs
        return [row["stage"] for row in self.state["history"]].count(stage)

    def stopped_early(self, stage: str) -> bool:
        """True when early stopping had ended `stage` at its last checkpoint, but the kill came
        before the stage was recorded as finished (the best weights are still to restore)."""
        stopper = self.state.get("callbacks", {}).get("early_stopping", {})
        return self.state["stage"] == stage and stage not in self.state["finished"] and \
            (stopper.get("stopped_epoch") or 0) > 0

    def restore_weights(self, model: keras.Model) -> None:
        """Loads the newest weights into the full model, or into `model` (the model of the
        stage being resumed) when they were saved from a model on cached features."""
        target = model if self.state.get("weights") == "stage" else self.full_model
        target.load_weights(self.current / "weights.weights.h5")

    def restore_optimizer(self, optimizer: keras.optimizers.Optimizer) -> None:
        saved = np.load(self.current / "optimizer.npz", allow_pickle=False)
        for i, variable in enumerate(optimizer.variables):
            variable.assign(saved[f"v{i}"])

    def track(self, **callbacks: keras.callbacks.Callback) -> None:
        """Saves these callbacks' state (names from CALLBACK_STATE) with every checkpoint."""
        self.tracked = callbacks

    def restore_callbacks(self) -> None:
        """Gives the tracked callbacks the state saved when the stage was interrupted."""
        saved = self.state.get("callbacks", {})
        for name, callback in self.tracked.items():
            if name in saved:
                callback.restored = dict(saved[name])
        best = self.current / "best_weights.npz" if self.current else None
        stopper = self.tracked.get("early_stopping")
        if stopper is not None and best is not None and best.is_file():
            arrays = np.load(best, allow_pickle=False)
            stopper.restored = (stopper.restored or {}) | {
                "best_weights": [arrays[f"w{i}"] for i in range(len(arrays.files))]}

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {"epoch": epoch + 1, "stage": self.stage}
        row |= {k: float(logs[k]) for k in HISTORY_FIELDS[2:6] if k in logs}
        row["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.save(self.state | {"stage": self.stage, "epoch": epoch + 1,
                                "history": self.state["history"] + [row]})

    def on_train_end(self, logs=None):
        # after EarlyStopping may have restored the best weights
        self.save(self.state | {"finished": self.state["finished"] + [self.stage]})

    def save(self, state: dict) -> None:
        # A model on cached features cannot change the frozen stem: saving only its weights
        # takes milliseconds, where the full backbone's take over a second per epoch.
        stage_only = self.model is not self.full_model
        number = state.get("saves", 0) + 1
        self.state = state | {"weights": "stage" if stage_only else "full", "saves": number,
                              "callbacks": self._callback_state()}
        name = f"save-{number:06d}"
        temp = self.folder / f".{name}.tmp"
        shutil.rmtree(temp, ignore_errors=True)  # left by a process killed while writing it
        temp.mkdir(parents=True)
        fault = _fault_step(number)
        (self.model if stage_only else self.full_model).save_weights(temp / "weights.weights.h5")
        fault(1)
        with open(temp / "optimizer.npz", "wb") as f:
            np.savez(f, **{f"v{i}": keras.ops.convert_to_numpy(v)
                           for i, v in enumerate(self.model.optimizer.variables)})
        fault(2)
        stopper = self.tracked.get("early_stopping")
        if stopper is not None and stopper.best_weights is not None:
            with open(temp / "best_weights.npz", "wb") as f:
                np.savez(f, **{f"w{i}": w for i, w in enumerate(stopper.best_weights)})
        fault(3)
        (temp / "state.json").write_text(json.dumps(self.state, indent=1))
        fault(4)
        shutil.rmtree(self.folder / name, ignore_errors=True)  # renamed by a killed process
        os.replace(temp, self.folder / name)                   # that never made it current
        fault(5)
        write_text(self.folder / "current", name + "\n")
        self.current = self.folder / name
        fault(6)
        for old in self.folder.glob("save-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        fault(7)

    def _callback_state(self) -> dict:
        return {name: {attribute: _plain(getattr(callback, attribute, None))
                       for attribute in CALLBACK_STATE[name]}
                for name, callback in self.tracked.items()}


def _plain(value):
    """A callback attribute as JSON: numpy and tensor scalars become Python numbers."""
    if value is None or isinstance(value, (int, float, str)):
        return value
    return float(keras.ops.convert_to_numpy(value))


def _fault_step(save: int):
    """The fault-injection hook of one save (a no-op unless FAULT_VARIABLE names it)."""
    wanted = os.environ.get(FAULT_VARIABLE, "")
    if not wanted:
        return lambda step: None
    kill_save, kill_step = (int(part) for part in wanted.split(":"))

    def maybe_kill(step: int) -> None:
        if save == kill_save and step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    return maybe_kill
