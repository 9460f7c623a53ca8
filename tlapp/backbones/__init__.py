"""Backbones: the registry (name or path -> spec), families, cut points and costs."""
