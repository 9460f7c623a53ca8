"""tlapp: transfer learning for image folders with Keras 3 on TensorFlow.

Public API: train, evaluate, predict, export, load_run, Config. They are loaded on first
use, so `import tlapp` (and `tlapp --help`) does not wait for TensorFlow.
"""
import importlib

__version__ = "0.1.0"
_API = {
    "Config": ("tlapp.config", "Config"),
    "UserInputError": ("tlapp.config", "UserInputError"),
    "Run": ("tlapp.runs", "Run"),
    "train": ("tlapp.pipeline", "train"),
    "evaluate": ("tlapp.runs", "evaluate_run"),
    "predict": ("tlapp.runs", "predict"),
    "load_run": ("tlapp.runs", "load_run"),
    "export": ("tlapp.exporting", "export_saved_model"),
}
__all__ = sorted(_API)


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'tlapp' has no attribute {name!r}")
    module, attribute = _API[name]
    return getattr(importlib.import_module(module), attribute)
