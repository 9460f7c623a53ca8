"""Hyperparameter search: an experiment file with a [search] table (space.py), an Optuna
study stored beside the results (study.py), trials on the shared feature cache
(runner.py, through `tlapp.pipeline.trials`) and the outputs (results.py)."""
