"""tlapp: transfer learning for image folders with Keras 3 on TensorFlow.

Public API: train, lr_find, run_search, evaluate, predict, export, load_run, Config. They
are loaded on first use, so `import tlapp` (and `tlapp --help`) does not wait for TensorFlow.
"""
import importlib

__version__ = "0.2.0"
_API = {
    "Config": ("tlapp.config", "Config"),
    "UserInputError": ("tlapp.errors", "UserInputError"),
    "Run": ("tlapp.inference.runs", "Run"),
    "train": ("tlapp.pipeline", "train"),
    "lr_find": ("tlapp.pipeline", "lr_find"),
    "run_search": ("tlapp.search.runner", "run_search"),
    "evaluate": ("tlapp.inference.evaluate", "evaluate_run"),
    "predict": ("tlapp.inference.runs", "predict"),
    "load_run": ("tlapp.inference.runs", "load_run"),
    "export": ("tlapp.inference.export", "export_saved_model"),
}
__all__ = sorted(_API)


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'tlapp' has no attribute {name!r}")
    module, attribute = _API[name]
    return getattr(importlib.import_module(module), attribute)
