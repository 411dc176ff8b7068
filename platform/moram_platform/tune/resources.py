"""Resource arithmetic of a sweep: what one trial holds at its peak, and how many fit at once.

A training trial is a small driver (its own share, reserved by Tune) that starts Ray Train
workers for each task and one evaluation task after it; the workers and the evaluation are
scheduled outside the trial's placement group and never run at the same time for one trial,
so a trial's peak is ``trial_cpu + num_workers x cpus_per_worker`` (and the workers' GPUs).
Tune only knows the trial's own share, so the number of concurrent trials is capped here by
what the cluster can hold at everybody's peak; otherwise two trials' workers could each wait
for CPUs the other holds (the classic Tune-over-Train deadlock on a small machine).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..cluster import worker_resources
from ..config import JobConfig

_EPS = 1e-6  # Ray counts resources in units of 1e-4; fractional shares must add up exactly


class ResourceError(ValueError):
    """A trial cannot fit the cluster; the message says what it needs and which keys set that."""


@dataclass(frozen=True)
class TrialShare:
    """The resources one trial holds at its peak, split into what Tune reserves for the trial
    itself and what its Ray Train workers (or evaluation) take on top."""

    trial: dict[str, float]
    workers: dict[str, float]
    explanation: str           # how the numbers come from the config, for error messages

    @property
    def total(self) -> dict[str, float]:
        keys = set(self.trial) | set(self.workers)
        return {k: round(self.trial.get(k, 0.0) + self.workers.get(k, 0.0), 4) for k in sorted(keys)}


def training_trial_share(config: JobConfig, trial_cpu: float) -> TrialShare:
    scaling = config.scaling
    per_worker = worker_resources(config)
    workers = {k: round(v * scaling.num_workers, 4) for k, v in per_worker.items()}
    explanation = (f"{trial_cpu:g} CPU (resources.trial_cpu) + {scaling.num_workers} x {scaling.cpus_per_worker:g} "
                   "CPU (scaling.num_workers x scaling.cpus_per_worker)")
    if "GPU" in per_worker:
        explanation += f" and {scaling.num_workers} x {per_worker['GPU']:g} GPU (scaling.gpus_per_worker)"
    return TrialShare({"CPU": trial_cpu}, workers, explanation)


def evaluation_trial_share(config: JobConfig) -> TrialShare:
    """An evaluation-only (δ) trial evaluates in its own process with one worker's resources."""
    per_worker = worker_resources(config)
    explanation = f"{config.scaling.cpus_per_worker:g} CPU (scaling.cpus_per_worker)"
    if "GPU" in per_worker:
        explanation += f" and {per_worker['GPU']:g} GPU (scaling.gpus_per_worker)"
    return TrialShare(per_worker, {}, explanation)


def concurrent_trials(share: TrialShare, cluster: dict[str, float], wanted: int, what: str) -> int:
    """How many trials run at once: ``wanted``, or fewer if the cluster cannot hold that many at
    their peak. Raises ResourceError if not even one fits."""
    fits = wanted
    for resource, need in share.total.items():
        if need <= 0:
            continue
        have = float(cluster.get(resource, 0.0))
        fits = min(fits, math.floor(have / need + _EPS))
    if fits < 1:
        have = ", ".join(f"{cluster.get(k, 0):g} {k}" for k in share.total)
        raise ResourceError(
            f"scaling: one {what} needs {share.explanation} = "
            + " and ".join(f"{v:g} {k}" for k, v in share.total.items())
            + f", but the Ray cluster has {have}; lower scaling.num_workers or scaling.cpus_per_worker"
            + (" or resources.trial_cpu" if share.workers else "") + ", or add nodes")
    return fits
