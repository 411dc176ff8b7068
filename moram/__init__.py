"""MoRAM: Mixture of Rank-1 Associative Memory experts for continual learning (pure PyTorch)."""
from .config import MoRAMConfig, MoRAMConfigError
from .functional import moram_delta, route
from .layer import MoRAMLayer
from .loading import load_causal_lm, model_fingerprint, smollm2_path
from .methods import METHODS, Method
from .model import MoRAMModel, TaskReport, get_moram_model
from .persistence import Shard, ShardError, read_shard

__all__ = [
    "METHODS", "Method", "MoRAMConfig", "MoRAMConfigError", "MoRAMLayer", "MoRAMModel", "Shard", "ShardError",
    "TaskReport", "get_moram_model", "load_causal_lm", "model_fingerprint", "moram_delta", "read_shard", "route", "smollm2_path",
]
