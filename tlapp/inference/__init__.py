"""Finished runs: prediction (TTA, ensembles), evaluation, export."""
