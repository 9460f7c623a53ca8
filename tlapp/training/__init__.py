"""Training: the head and models around a backbone, fit loops, checkpoints."""
