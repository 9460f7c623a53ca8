"""Starting TensorFlow quietly: its C++ start-up lines are not for users."""
from __future__ import annotations

import contextlib
import importlib.abc
import os
import sys
import tempfile
from typing import Callable

from tlapp.errors import UserInputError


@contextlib.contextmanager
def native_stderr_hidden():
    """Hides what native code writes to file descriptor 2 during the block (TensorFlow's C++
    start-up lines, which TF_CPP_MIN_LOG_LEVEL does not silence); shows it if the block
    fails, so a broken installation still explains itself."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except UserInputError:  # a message for the user; TensorFlow's lines are noise to it
            raise
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# Libraries that Keras imports when it is imported, if they are installed, for features tlapp
# never uses: its scikit-learn wrappers, pandas inputs to `fit`, pyplot image galleries.
# Together about 40% of `import tensorflow` (a second or more of every command's start).
# They stay importable afterwards (MLflow, Optuna and users may import them as usual).
SKIPPED_AT_START = ("sklearn", "pandas", "matplotlib.pyplot")


class _NotAtStart(importlib.abc.MetaPathFinder):
    """Makes `import NAME` fail (as if NAME were not installed) for a few names."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name in self.names:
            raise ModuleNotFoundError(f"{name} is not imported while TensorFlow starts",
                                      name=name)
        return None


@contextlib.contextmanager
def optional_imports_skipped(names: tuple[str, ...] = SKIPPED_AT_START):
    """During the block, Keras's optional imports of `names` find nothing (Keras then leaves
    those features out, as it does when they are not installed); afterwards they import as
    usual. Nothing changes when one of them is already imported."""
    if any(name in sys.modules for name in names):
        yield
        return
    finder = _NotAtStart(names)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def start_tensorflow(show_native_output: bool,
                     before_devices: Callable[[], None] | None = None) -> None:
    """Imports TensorFlow and initialises its devices, quietly unless asked.

    `before_devices` runs in between: what must precede device initialisation (a
    multi-worker strategy, a logical device split).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if show_native_output else "2")
    with contextlib.nullcontext() if show_native_output else native_stderr_hidden():
        with optional_imports_skipped():
            import keras  # noqa: F401 - imports TensorFlow; what the commands import first
            import tensorflow as tf

        if before_devices is not None:
            before_devices()
        tf.config.list_logical_devices()
