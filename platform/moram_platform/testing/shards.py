"""Synthetic MoRAM shards of any size, in the exact format ``moram`` writes (for tests and
benchmarks that exercise storage, not training)."""
from __future__ import annotations

import torch

from moram import METHODS, MoRAMConfig
from moram.persistence import shard_to_bytes

LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def synthetic_shard(task: str = "task-0", task_index: int = 0, *, num_layers: int = 2, width: int = 16,
                    r: int = 4, kept: int | None = None, dtype: torch.dtype = torch.float32, seed: int = 0,
                    method: str = "moram") -> bytes:
    """A shard for ``num_layers`` LLaMA-style attention blocks (q, k, v, o of ``width`` x
    ``width``) with ``kept`` of ``r`` atoms per layer (all by default), random values.

    The 32-layer, 4096-wide, r=8 bf16 case is the size of a real 7B-model task shard (~17 MB).
    """
    kept = r if kept is None else kept
    generator = torch.Generator().manual_seed(seed)
    config = MoRAMConfig(r=r, k=r, method=method, target_modules=list(LLAMA_ATTENTION))
    blocks = {}
    for layer in range(num_layers):
        for projection in LLAMA_ATTENTION:
            blocks[f"model.layers.{layer}.self_attn.{projection}"] = {
                "A": torch.randn(kept, width, generator=generator).to(dtype),
                "B": torch.randn(width, kept, generator=generator).to(dtype),
                "mass": torch.rand(kept, generator=generator),
                "routing_mass": torch.rand(r * (task_index + 1), generator=generator),
                "kept": torch.arange(kept),
            }
    metadata = {
        "task": task, "task_index": task_index, "method": method,
        "mode": METHODS[method].shard_mode, "config": config.to_dict(),
        "added": {name: r for name in blocks},
    }
    return shard_to_bytes(blocks, metadata)
