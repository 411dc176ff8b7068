"""Ray, once: joining the cluster (or starting an embedded one), what one worker holds, what
the cluster offers. The sequence driver, the job entry points and Tune all read these."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import JobConfig


def start_ray(console=None) -> None:
    """Join the cluster named by $RAY_ADDRESS, else start Ray in this process (embedded, no
    dashboard). With a job's ``console`` (moram_platform.console.JobConsole), Ray's workers log
    at the job's level and their output goes where the console routes it (terminal or log)."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {}
    if console is not None:
        console.route_worker_output()
        console.reclaim_ray_logger()
        kwargs = console.ray_init_kwargs()
    if os.environ.get("RAY_ADDRESS"):
        kwargs["address"] = os.environ["RAY_ADDRESS"]
    else:
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)
    if console is not None:
        console.reclaim_ray_logger()


def worker_resources(config: JobConfig) -> dict[str, float]:
    """One Ray Train worker's resources (``scaling.*``), which an evaluation task of the
    sequence takes too: {"CPU": ..., "GPU": ... with scaling.use_gpu}."""
    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu and scaling.gpus_per_worker > 0:
        resources["GPU"] = scaling.gpus_per_worker
    return resources


def cluster_resources() -> dict[str, float]:
    """The CPUs and GPUs of the Ray cluster this process is connected to."""
    import ray

    return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
