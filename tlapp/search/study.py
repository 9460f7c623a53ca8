"""The Optuna study behind a search: stored in OUT/study.db (SQLite), so a rerun continues it.

Optuna (not KerasTuner): real median pruning from per-epoch reports, a sampler for any
Python objective (the trials train through tlapp's own pipeline, not a Keras HyperModel),
inspectable trial states in one SQLite file, and an import that does not load TensorFlow.

A trial that was running when its process died (SIGKILL, power loss) stays RUNNING in the
database. A search holds a lock on its folder while it runs, so at the next start such a
trial is known to be dead: it is marked FAIL (listed in the study's `interrupted` attribute) and its
parameters are tried again first (`retry_of`). Interrupted trials do not count towards
`trials`; trials that failed with an error do (a setting that always fails must not loop).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import warnings
from pathlib import Path

from tlapp.errors import UserInputError
from tlapp.search.space import SearchSpec

log = logging.getLogger(__name__)

STUDY = "search"


def import_optuna():
    try:
        import optuna
    except ModuleNotFoundError:
        raise UserInputError('A [search] needs Optuna: pip install "tlapp[search]"') from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tlapp logs each trial itself
    return optuna


@contextlib.contextmanager
def search_lock(out: Path):
    """Holds OUT/.search.lock while the search runs; a second process gets a UserInputError
    at once (two writers would also make the interrupted-trial recovery unsafe)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".search.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise UserInputError(f"Another tlapp process (PID {lock.read().strip() or '?'}) "
                                 f"is running the search in {out}; wait for it to finish.") \
                from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def open_study(spec: SearchSpec, database: Path):
    """Creates or loads the study; samplers are re-created on every start (Optuna does not
    store them), seeded with sampler_seed + the number of trials so far: a resumed random
    phase does not replay the samples it already drew."""
    optuna = import_optuna()
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{database.resolve()}", engine_kwargs={"connect_args": {"timeout": 60}})
    exists = STUDY in optuna.study.get_all_study_names(storage)
    done = len(optuna.load_study(study_name=STUDY, storage=storage).trials) if exists else 0
    seed = spec.sampler_seed + done
    if spec.method == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = tpe_sampler(optuna, spec, seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials,
                                         n_warmup_steps=1) \
        if spec.prune else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=STUDY, storage=storage, load_if_exists=True,
                                direction="maximize", sampler=sampler, pruner=pruner)
    fingerprint = study.user_attrs.get("spec")
    if fingerprint is None:
        study.set_user_attr("spec", spec.fingerprint())
        study.set_user_attr("method", spec.method)
    elif fingerprint != spec.fingerprint():
        log.warning("search: the [search] table changed since this study started; its %d "
                    "trials so far are kept and the new settings apply from now on", done)
        study.set_user_attr("spec", spec.fingerprint())
    return study


def tpe_sampler(optuna, spec: SearchSpec, seed: int):
    """Optuna's TPE with `startup_trials` random trials first (Optuna's default, 10, would
    leave 2 guided trials of a 12-trial search) and, unless the file says otherwise, the
    multivariate TPE, which Optuna's documentation reports outperforms the independent one
    on single-objective problems (the default from Optuna 5; given explicitly so that
    Optuna 4 samples alike). `group` stays off: every trial draws the same parameters, so
    there is nothing to decompose. `constant_liar` matters only for parallel workers on one
    study, and a search has one (OUT/.search.lock)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multivariate" is experimental in Optuna 4
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials,
                                          multivariate=spec.multivariate)


def recover_interrupted(study) -> list[int]:
    """Marks trials left RUNNING by a dead process as failed and queues their parameters
    again; returns their numbers. Only safe under `search_lock`."""
    from optuna.trial import TrialState

    numbers = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.set_user_attr("interrupted", interrupted(study) + [trial.number])
        study.tell(trial.number, state=TrialState.FAIL)
        numbers.append(trial.number)
        if not trial.params:  # died before drawing any value: nothing to try again
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # enqueue_trial is "experimental" in some versions
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number},
                                skip_if_exists=False)
    return numbers


def interrupted(study) -> list[int]:
    """Numbers of the trials a dead process left behind (recorded by the recovery)."""
    return list(study.user_attrs.get("interrupted", []))


def counted(study) -> int:
    """Trials that count towards the budget: finished, pruned, or failed by an error (not
    the ones interrupted by a dead process)."""
    from optuna.trial import TrialState

    skip = set(interrupted(study))
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.number not in skip))
