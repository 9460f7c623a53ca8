"""The cluster of a multi-worker run, read from the TF_CONFIG environment variable.

Plain JSON, no TensorFlow: TensorFlow's own checks of TF_CONFIG run when the strategy is
made and end in a traceback ("The `task_id` 3 exceeds the maximum id of worker"), so the
user's mistakes are caught here first, with a message that says what to fix.
"""
from __future__ import annotations

import dataclasses
import json
import os

from tlapp.errors import UserInputError

EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
           '"task": {"type": "worker", "index": 0}}')
JOBS = ("chief", "worker")  # the tasks that train; the chief (or worker 0) writes the files


@dataclasses.dataclass(frozen=True)
class Task:
    """Where this process stands in the cluster."""

    tasks: int  # chief and worker tasks in the cluster
    index: int  # this process's place among them: 0 is the chief (or worker 0 without one)


def _refuse(problem: str, text: str) -> UserInputError:
    return UserInputError(
        f"TF_CONFIG {problem}. It must be JSON like {EXAMPLE}: every machine gets the same "
        f"cluster and its own task (README 'Scaling out'). Received: TF_CONFIG={text!r}")


def read_cluster() -> dict[str, list[str]] | None:
    """The chief and worker addresses TF_CONFIG lists; None when it is unset or empty."""
    text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        return None
    try:
        cluster = json.loads(text)["cluster"]
    except (ValueError, KeyError, TypeError):
        raise _refuse("is not JSON with a \"cluster\"", text) from None
    if not isinstance(cluster, dict):
        raise _refuse("has a \"cluster\" that is not an object", text)
    jobs = {}
    for job in JOBS:
        addresses = cluster.get(job, [])
        if not isinstance(addresses, list) or not all(
                isinstance(a, str) and ":" in a for a in addresses):
            raise _refuse(f"must list the {job} tasks as \"host:port\" strings", text)
        jobs[job] = addresses
    if len(jobs["chief"]) > 1:
        raise _refuse("lists more than one chief", text)
    return jobs


def cluster_tasks() -> int:
    """The number of chief and worker tasks TF_CONFIG lists (0 when it is unset)."""
    jobs = read_cluster()
    return 0 if jobs is None else sum(len(addresses) for addresses in jobs.values())


def read_task() -> Task:
    """This process's task in a valid TF_CONFIG (multi-worker training needs one)."""
    text = os.environ.get("TF_CONFIG", "")
    jobs = read_cluster()
    if not jobs or not any(jobs.values()):
        raise UserInputError(
            "--strategy multi-worker trains on the machines listed in the TF_CONFIG "
            f"environment variable, which is unset or lists no worker. Set it on every "
            f"machine, e.g. TF_CONFIG='{EXAMPLE}' (README 'Scaling out'). Received: "
            f"TF_CONFIG={os.environ.get('TF_CONFIG')!r}")
    task = json.loads(text).get("task")
    if not isinstance(task, dict) or task.get("type") not in JOBS:
        raise _refuse("must give this process's task, of type \"chief\" or \"worker\"", text)
    index = task.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool) or \
            not 0 <= index < len(jobs[task["type"]]):
        raise _refuse(f"gives a task index that is not one of the {len(jobs[task['type']])} "
                      f"{task['type']} task(s) of the cluster", text)
    chief = len(jobs["chief"])
    return Task(chief + len(jobs["worker"]),
                index + chief if task["type"] == "worker" else 0)
