"""What a Tune driver of whole sequences needs (the sweep's training trials, a study's points):
the sequence run outside the trial's placement group with its rows reported back, a Tuner
that resumes an interrupted experiment, how many trials fit, and the name rule of a sweep or
study (it prefixes run ids and storage paths)."""
from __future__ import annotations

import logging
import os
from queue import Empty
from typing import Any, Iterator

from ..config import JobConfig, config_from_dict
from ..names import name_problem
from .resources import ResourceError, TrialShare, concurrent_trials
from .space import SpaceError

log = logging.getLogger(__name__)

_POLL_S = 2.0
MAX_NAME = 64   # room for the trial and point suffixes within a run id's 128 characters


class SweepError(RuntimeError):
    """A sweep could not produce a result (e.g. no trial finished its sequence)."""


def sequence_rows(config: JobConfig, trial_run: str) -> Iterator[tuple[int, list[list[float]]]]:
    """(task index, accuracy matrix so far) after each task of ``run_sequence(config)``.

    The sequence runs in a task of its own, outside the trial's placement group: Tune's group
    captures every task a trial starts, and the sequence schedules its own Ray Train workers and
    evaluation tasks, which would not fit the trial's small share (and must not be counted in it).
    The rows come back through a queue, so ``tune.report`` is still called from the trial.
    """
    import ray
    from ray.util.queue import Queue

    rows = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": "DEFAULT"})
    # No retries: a failed sequence fails its trial, which Tune restarts (it resumes from the registry).
    sequence = ray.remote(num_cpus=0, max_retries=0)(_run_sequence).options(scheduling_strategy="DEFAULT")
    done = sequence.remote(config.to_dict(), trial_run, rows)
    while True:
        try:
            item = rows.get(timeout=_POLL_S)
        except Empty:
            if ray.wait([done], timeout=0)[0]:
                ray.get(done)   # the sequence died without saying so: raise its error
                raise SweepError(f"run {config.run.name}: the sequence ended without finishing")
            continue
        if item is None:
            break
        yield item
    ray.get(done)               # re-raises the sequence's error, if it failed


def _run_sequence(config_dict: dict[str, Any], trial_run: str, rows) -> dict[str, float]:
    from ..sequence import run_sequence

    try:
        result = run_sequence(config_from_dict(config_dict), parent_mlflow_run=trial_run, progress=False,
                              on_task_done=lambda index, matrix, baseline: rows.put((index, matrix)))
    finally:
        rows.put(None)
    return result.summary


def tuner(path: str, trainable, param_space, tune_config, run_config):
    """A new Tuner, or the interrupted one at ``path`` (unfinished and errored trials continue)."""
    from ray import tune

    if tune.Tuner.can_restore(path):
        log.info("restoring the Tune experiment at %s", path)
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def trial_concurrency(share: TrialShare, cluster: dict[str, float], wanted: int, what: str) -> int:
    """Concurrent trials the cluster holds now. On a cluster joined through RAY_ADDRESS, which may
    autoscale, a trial that does not fit yet is a warning (one trial at a time), like run_sequence."""
    try:
        return concurrent_trials(share, cluster, wanted, what)
    except ResourceError as error:
        if not os.environ.get("RAY_ADDRESS"):
            raise
        log.warning("%s; running one trial at a time while the cluster scales up", error)
        return 1


def tune_resources(resources: dict[str, float]) -> dict[str, float]:
    return {key.lower(): value for key, value in resources.items()}


def check_name(kind: str, name: str) -> str:
    """``name`` if it may name a sweep or study (``kind``), else SpaceError."""
    problem = name_problem(name, MAX_NAME)
    if problem is not None:
        raise SpaceError(f"{kind} name {name!r}: {problem} (it prefixes run ids and storage paths)")
    return name
