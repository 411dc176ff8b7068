"""Ray Tune sweeps over MoRAM's routing hyperparameters: τ and k (and lr) by training, δ by
evaluating finished trials (it acts only at inference), the best as a ready-to-use job config.

    from moram_platform.tune import load_space, run_sweep
    result = run_sweep(load_space("tune_spaces/trace.yaml"), "trace-tau-k", best_config_out="best.yaml")

Ray is imported only when a sweep runs; reading and checking space files needs none.
"""
from .resources import ResourceError, TrialShare, concurrent_trials, evaluation_trial_share, training_trial_share
from .space import (INFERENCE_KEYS, KNOWN_KEYS, Objective, Param, SpaceError, SweepSpace, load_space,
                    space_from_dict)
from .sweep import SweepError, SweepResult, TrialOutcome, best_job_config, run_sweep

__all__ = [
    "INFERENCE_KEYS", "KNOWN_KEYS", "Objective", "Param", "ResourceError", "SpaceError", "SweepError",
    "SweepResult", "SweepSpace", "TrialOutcome", "TrialShare", "best_job_config", "concurrent_trials",
    "evaluation_trial_share", "load_space", "run_sweep", "space_from_dict", "training_trial_share",
]
