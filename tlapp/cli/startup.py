"""Starting TensorFlow quietly: its C++ start-up lines are not for users."""
from __future__ import annotations

import contextlib
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


def start_tensorflow(show_native_output: bool,
                     before_devices: Callable[[], None] | None = None) -> None:
    """Imports TensorFlow and initialises its devices, quietly unless asked.

    `before_devices` runs in between: what must precede device initialisation (a
    multi-worker strategy, a logical device split).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if show_native_output else "2")
    with contextlib.nullcontext() if show_native_output else native_stderr_hidden():
        import tensorflow as tf

        if before_devices is not None:
            before_devices()
        tf.config.list_logical_devices()
