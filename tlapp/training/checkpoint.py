"""Checkpoints after every epoch, so an interrupted run resumes exactly where it stopped."""
from __future__ import annotations

import json
import os
from pathlib import Path

import keras
import numpy as np

HISTORY_FIELDS = ["epoch", "stage", "loss", "accuracy", "val_loss", "val_accuracy", "lr"]


class Checkpoint(keras.callbacks.Callback):
    """After every epoch: the full model's weights, the optimizer state and the history so far.

    Files in RUN/checkpoints/: weights.weights.h5, optimizer.npz, state.json (written last;
    each by temp file + rename, so a kill leaves the previous complete checkpoint).
    """

    def __init__(self, folder: Path, full_model: keras.Model):
        super().__init__()
        self.folder = Path(folder)
        self.full_model = full_model
        self.state = {"stage": None, "epoch": 0, "history": [], "finished": []}
        if (self.folder / "state.json").is_file():
            self.state = json.loads((self.folder / "state.json").read_text())
        self.restore_pending = bool(self.state["history"])
        self.stage = None

    def completed(self, stage: str, epochs: int) -> int:
        """Epochs of `stage` already done in the checkpoint (all of them once it finished,
        early stopping included)."""
        if stage in self.state["finished"]:
            return epochs
        return [row["stage"] for row in self.state["history"]].count(stage)

    def restore_weights(self, model: keras.Model) -> None:
        """Loads the newest weights into the full model, or into `model` (the model of the
        stage being resumed) when they were saved from a model on cached features."""
        target = model if self.state.get("weights") == "stage" else self.full_model
        target.load_weights(self.folder / "weights.weights.h5")

    def restore_optimizer(self, optimizer: keras.optimizers.Optimizer) -> None:
        saved = np.load(self.folder / "optimizer.npz", allow_pickle=False)
        for i, variable in enumerate(optimizer.variables):
            variable.assign(saved[f"v{i}"])

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
        self.folder.mkdir(parents=True, exist_ok=True)
        # A model on cached features cannot change the frozen stem: saving only its weights
        # takes milliseconds, where the full backbone's take over a second per epoch.
        stage_only = self.model is not self.full_model
        self.state = state | {"weights": "stage" if stage_only else "full"}
        temp = self.folder / "weights.tmp.weights.h5"
        (self.model if stage_only else self.full_model).save_weights(temp)
        os.replace(temp, self.folder / "weights.weights.h5")
        with open(self.folder / "optimizer.tmp.npz", "wb") as f:
            np.savez(f, **{f"v{i}": keras.ops.convert_to_numpy(v)
                           for i, v in enumerate(self.model.optimizer.variables)})
        os.replace(self.folder / "optimizer.tmp.npz", self.folder / "optimizer.npz")
        temp = self.folder / "state.tmp.json"
        temp.write_text(json.dumps(self.state, indent=1))
        os.replace(temp, self.folder / "state.json")
