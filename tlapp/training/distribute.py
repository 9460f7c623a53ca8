"""Training on several devices and machines with tf.distribute: the strategy of a run (its
Layout), input pipelines that shard before they decode, and the rest multi-worker training
needs (files written by the chief only, barriers).

- `--strategy one` trains on one device, exactly as without this module; `mirrored` on every
  local GPU (`tf.distribute.MirroredStrategy`); `multi-worker` on the machines that
  TF_CONFIG lists (`tf.distribute.MultiWorkerMirroredStrategy`); `auto` is mirrored when
  more than one GPU is visible, else one. Both need the Keras workaround of
  keras_distribute_patch.py (keras-team/keras#20585).
- `--batch-size` is the global batch: each step reads batch_size / replicas images per
  replica, and the gradients are summed across replicas (Keras scales each replica's loss
  by 1 / replicas), so a step updates the weights as one device would on the whole batch.
- With more than one replica: BatchNormalization layers normalise with the statistics of
  the global batch (synchronized), each epoch drops its last incomplete global batch (so
  every replica gets a full share; the order is reshuffled every epoch), and `--jit` is
  refused (XLA fails on variables mirrored on several devices).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
from pathlib import Path

import keras
import tensorflow as tf

from tlapp.config import Config
from tlapp.errors import UserInputError
from tlapp.training import cluster, keras_distribute_patch

log = logging.getLogger(__name__)

LOGICAL_CPUS = "TLAPP_LOGICAL_CPUS"  # split the CPU into N logical devices (for testing)
LAYOUT_FILE = "distribution.json"  # in the partial run folder: what --resume must match


@dataclasses.dataclass
class Layout:
    """The strategy of a run and where this process stands in it."""

    name: str  # one | mirrored | multi-worker (auto resolved)
    strategy: tf.distribute.Strategy
    replicas: int  # in sync, over all workers
    batch_size: int  # global
    workers: int = 1
    worker: int = 0  # this process's index; 0 is the chief
    _scope: object = dataclasses.field(default=None, repr=False)

    @property
    def is_chief(self) -> bool:
        """The one process that writes the run folder, checkpoints and TensorBoard logs."""
        return self.worker == 0

    def record(self) -> dict:
        """What config.toml cannot say: metrics.json's "distribution"."""
        return {"strategy": self.name, "replicas": self.replicas, "workers": self.workers,
                "global_batch": self.batch_size,
                "per_replica_batch": self.batch_size // self.replicas}

    @contextlib.contextmanager
    def scope(self):
        """The strategy's scope (none for `one`, which keeps single-device runs unchanged):
        models built and compiled inside it train on every replica."""
        if self.name == "one":
            yield self
            return
        self._enter()
        try:
            yield self
        finally:
            self._exit()

    @contextlib.contextmanager
    def paused(self):
        """Leaves the scope for the block (feature extraction: no strategy, one copy of each
        row), then enters it again."""
        if self._scope is None:
            yield
            return
        self._exit()
        try:
            yield
        finally:
            self._enter()

    def _enter(self) -> None:
        self._scope = self.strategy.scope()
        self._scope.__enter__()

    def _exit(self) -> None:
        scope, self._scope = self._scope, None
        scope.__exit__(None, None, None)


def prepare_process(strategy: str) -> None:
    """What must happen before TensorFlow initialises its devices: the logical CPU split of
    TLAPP_LOGICAL_CPUS, and a multi-worker strategy. The CLI calls it before start-up;
    `make_layout` calls it again (a no-op by then)."""
    split_cpu()
    if strategy == "multi-worker":
        multi_worker_strategy()


def split_cpu() -> int:
    """Applies TLAPP_LOGICAL_CPUS=N: N logical CPU devices, so that distribution code runs on
    a machine without GPUs (no speed-up: they share the cores). Returns N (1 when unset)."""
    text = os.environ.get(LOGICAL_CPUS, "")
    if not text:
        return 1
    if not text.isdigit() or int(text) < 1:
        raise UserInputError(f"{LOGICAL_CPUS} must be a number of logical CPU devices (1 or "
                             f"more). Received: {LOGICAL_CPUS}={text!r}")
    count = int(text)
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or [None]) == count:
        return count
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
    except RuntimeError:
        raise UserInputError(f"{LOGICAL_CPUS}={count} must take effect before TensorFlow "
                             f"starts: set it before the first TensorFlow operation of the "
                             f"process.") from None
    return count


@functools.cache
def multi_worker_strategy() -> tf.distribute.MultiWorkerMirroredStrategy:
    """The process's MultiWorkerMirroredStrategy (TensorFlow allows one per process, made
    before its devices are initialised), with the Keras workaround installed."""
    cluster.read_task()  # the user's TF_CONFIG mistakes, before TensorFlow's tracebacks
    patch_keras()
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as e:  # "Collective ops must be configured at program startup"
        raise UserInputError(
            "--strategy multi-worker must be set up before TensorFlow starts: run it with "
            "`tlapp train`, or call tlapp.train first thing in a fresh Python process. "
            f"Received: {e}") from None
    except (ValueError, TypeError) as e:  # a TF_CONFIG that passed read_task, still wrong
        raise UserInputError(f"TensorFlow refused the cluster of TF_CONFIG: {e} Received: "
                             f"TF_CONFIG={os.environ.get('TF_CONFIG')!r}") from None


@functools.cache
def mirrored_strategy(devices: tuple[str, ...]) -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy per set of devices and process: a second one would reuse the
    first one's collective keys ("Shape mismatch in the collective instance")."""
    return tf.distribute.MirroredStrategy(list(devices) or None)


def patch_keras() -> None:
    try:
        keras_distribute_patch.apply()
    except RuntimeError as e:  # Keras changed: the message says what to install
        raise UserInputError(str(e)) from None


def one_device(batch_size: int) -> Layout:
    """No strategy: what a range test or a search trial trains with."""
    return Layout("one", tf.distribute.get_strategy(), 1, batch_size)


def make_layout(config: Config) -> Layout:
    """Creates the run's strategy (the first TensorFlow action of a run) and checks the
    config against it."""
    prepare_process(config.strategy)
    workers, worker = 1, 0
    if config.strategy == "multi-worker":
        name, strategy = "multi-worker", multi_worker_strategy()
        task = cluster.read_task()
        workers, worker = task.tasks, task.index
    else:
        gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
        if config.strategy == "mirrored" or (config.strategy == "auto" and len(gpus) > 1):
            cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
            name = "mirrored"
            strategy = mirrored_strategy(tuple(gpus or (cpus if len(cpus) > 1 else ())))
        else:
            name, strategy = "one", tf.distribute.get_strategy()
        if cluster.cluster_tasks() > 1:
            log.warning("TF_CONFIG lists %d tasks, but --strategy is %s: this process trains "
                        "on its own. Pass --strategy multi-worker to train across them.",
                        cluster.cluster_tasks(), config.strategy)
    layout = Layout(name, strategy, strategy.num_replicas_in_sync, config.batch_size,
                    workers, worker)
    check_config(config, layout)
    if name != "one":  # one replica too: the patch spares every validation an iterator
        patch_keras()
    if name != "one":
        log.info("strategy %s: %d replicas%s, global batch %d = %d per replica", name,
                 layout.replicas, f" on {workers} workers (this is worker {worker})"
                 if name == "multi-worker" else "", config.batch_size,
                 config.batch_size // layout.replicas)
    return layout


def check_config(config: Config, layout: Layout) -> None:
    if layout.replicas > 1 and config.jit:
        raise UserInputError(
            f"--jit (XLA) does not work with a multi-device strategy: XLA cannot reach "
            f"variables mirrored on other devices ('Trying to access resource ... located in "
            f"device ...'). Drop --jit, or train on one device with --strategy one. Received: "
            f"jit=True, strategy={layout.name!r} with {layout.replicas} replicas")
    if config.batch_size % layout.replicas:
        raise UserInputError(
            f"--batch-size is the global batch, split evenly across the {layout.replicas} "
            f"replicas: it must be a multiple of {layout.replicas}. Received: "
            f"batch_size={config.batch_size}")


def check_resume_layout(folder: Path, layout: Layout) -> None:
    """Refuses to resume a run written with a different replica layout (its optimizer steps,
    batches and batch statistics assume it); `folder` is the partial run folder."""
    path = Path(folder) / LAYOUT_FILE
    # a run from before this file existed trained on one device
    saved = json.loads(path.read_text()) if path.is_file() else \
        {"strategy": "one", "replicas": 1, "workers": 1}
    if (saved["replicas"], saved["workers"]) != (layout.replicas, layout.workers):
        raise UserInputError(
            f"The checkpoint in {folder} was written by training on {saved['replicas']} "
            f"replica(s) ({saved['workers']} worker(s), strategy {saved['strategy']}); this "
            f"process has {layout.replicas} ({layout.workers} worker(s), strategy "
            f"{layout.name}). A run resumes only with the replica layout it started with: "
            f"make the same devices visible (CUDA_VISIBLE_DEVICES, TF_CONFIG), or start a "
            f"new run. Received: replicas={layout.replicas}, workers={layout.workers}")


def synchronize_batchnorm(model: keras.Model, layout: Layout, synchronized: bool = True) -> None:
    """With more than one replica, BatchNormalization layers that train use the mean and
    variance of the global batch rather than of each replica's share (Keras reads the flag
    when it traces the train step). Call again with synchronized=False before saving, so
    model.keras holds the plain layer (the flag exists on the TensorFlow backend only)."""
    if layout.replicas == 1:
        return  # the synchronized path rounds differently: keep single-device runs as they were
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = synchronized


def _all_layers(model: keras.Model):
    for layer in getattr(model, "layers", ()):
        yield layer
        yield from _all_layers(layer)


def extraction_model(model: keras.Model, layout: Layout) -> keras.Model:
    """The stem to extract features with: bound to no strategy (built outside any scope;
    use it inside `layout.paused()`), so it computes each row once, on one device."""
    if layout.name == "one":
        return model
    if tf.distribute.has_strategy():
        raise RuntimeError("extraction_model must be called inside layout.paused()")
    return keras.Model(model.input, model.output, name=model.name)


def barrier(layout: Layout) -> None:
    """Returns once every worker has called it (a no-op on one machine). A one-element
    all-reduce cannot finish before all workers join, and uses public API only."""
    if layout.workers > 1:
        strategy = layout.strategy
        strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)


@contextlib.contextmanager
def chief_first(layout: Layout):
    """The chief runs the block first, then the other workers (e.g. extraction into a
    shared cache: they then find the chief's rows instead of writing the same ones)."""
    if not layout.is_chief:
        barrier(layout)
    yield
    if layout.is_chief:
        barrier(layout)
