"""Augmentation: the spec language (spec.py, pure Python) and its TensorFlow ops (ops.py)."""
