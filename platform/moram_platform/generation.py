"""Use a trained memory: a registry version on its base model, generating answers to prompts.

    spec = RegistrySpec.parse("s3://bucket/moram#trace-run@3")      # or RegistrySpec(uri, run, 3)
    model, tokenizer, memory = load_memory_model(spec, delta=0.3)   # base model from the manifest
    print(generate(model, tokenizer, ["What is 2 + 2?"], max_new_tokens=16))

A version's manifest records its base model as an id and a revision (a content hash of the
weights, ``moram.model_fingerprint``). The id is loaded when it is a local model (a folder or a
.gguf file) or the packaged SmolLM2-135M; otherwise the caller names the model (``base_model``).
Either way the model's fingerprint must match the recorded revision: atoms trained on one base
model mean nothing on another.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from moram import load_causal_lm, model_fingerprint, smollm2_path
from moram.loading import resolve_model_source
from moram.pretrained import PretrainedMemory, check_base_model, from_pretrained, load_memory

from .causal_lm import DTYPES, SMOLLM2, SMOLLM2_ID, model_cache_dir
from .registry import Registry, Version, VersionNotFoundError



class GenerationError(ValueError):
    """A base model cannot be found or does not match, or a prompt file is malformed."""


# -- which memory ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RegistrySpec:
    """A registry version as a memory source: ``uri#run@version`` (``@version`` optional: the
    latest). Pass it wherever ``moram.pretrained.from_pretrained`` takes a folder."""

    uri: str
    run: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> "RegistrySpec":
        uri, sep, rest = text.rpartition("#")
        if not sep or not uri or not rest:
            raise GenerationError(f"registry spec {text!r}: expected URI#RUN[@VERSION], e.g. s3://bucket/moram#trace-run@3")
        run, at, number = rest.rpartition("@")
        if at and number.isdigit():   # run names may contain '@': only a numeric suffix is a version
            return cls(uri, run, int(number))
        if at and number == "latest":
            return cls(uri, run)
        return cls(uri, rest)

    def __str__(self) -> str:
        return f"{self.uri}#{self.run}" + (f"@{self.version}" if self.version is not None else "")

    def resolve(self) -> Version:
        """The version this spec names (the run's latest when no number is given)."""
        registry = Registry(self.uri)
        if self.version is not None:
            return registry.version(self.run, self.version)
        latest = registry.latest(self.run)
        if latest is None:
            raise VersionNotFoundError(f"run {self.run} has no versions in {registry.uri}")
        return latest

    def load_memory(self) -> PretrainedMemory:
        version = self.resolve()
        shards = Registry(self.uri).read_shards(self.run, version.version)
        return PretrainedMemory(config=version.config, shards=shards, tasks=[ref.task for ref in version.shards],
                                base_model_id=version.base_model.id, base_model_revision=version.base_model.revision,
                                where=f"run {self.run} version {version.version}")


def memory_source(source: RegistrySpec | PretrainedMemory | str | os.PathLike):
    """A folder stays a folder; ``uri#run[@version]`` text becomes a RegistrySpec."""
    if not isinstance(source, (str, os.PathLike)):
        return source   # a RegistrySpec, a PretrainedMemory or another memory source
    if Path(source).expanduser().is_dir() or "#" not in str(source):
        return Path(source).expanduser()
    return RegistrySpec.parse(str(source))


# -- which base model ------------------------------------------------------------------------
def base_model_path(memory: PretrainedMemory, override: str | os.PathLike | None = None) -> Path:
    """The base model to load: ``override`` if given, else the memory's recorded id when that
    is a local model or the packaged SmolLM2; its fingerprint must match the recorded revision."""
    source = str(override) if override is not None else memory.base_model_id
    if source in (SMOLLM2, SMOLLM2_ID):
        path = smollm2_path()
    else:
        path = Path(source or "").expanduser()
        hint = "" if override is not None else " (pass the model with --base-model)"
        try:
            folder, gguf = resolve_model_source(path)
        except (FileNotFoundError, ValueError) as error:
            raise GenerationError(f"{memory.where}: base model {source!r} is not a local model{hint}: {error}") from None
        if gguf is None and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise GenerationError(f"{memory.where}: base model folder {folder} has no weights "
                                  f"(*.safetensors or *.bin){hint}")
    try:
        check_base_model(memory, model_fingerprint(path))
    except ValueError as error:
        raise GenerationError(f"{error} ({path})") from None
    return path


def load_memory_model(source: RegistrySpec | PretrainedMemory | str | os.PathLike, *,
                      base_model: str | os.PathLike | None = None, delta: float | None = None, prune_mass: float | None = None, dtype: str = "float32",
                      device: str | torch.device = "cpu"):
    """(model, tokenizer, memory): the base model with the memory's atoms, in eval mode.
    ``source``: a RegistrySpec or its ``uri#run@version`` text, or a saved/exported folder."""
    memory = load_memory(memory_source(source))
    path = base_model_path(memory, base_model)
    base, tokenizer = load_causal_lm(path, dtype=DTYPES[dtype], cache_dir=_model_cache())
    model = from_pretrained(base, memory, delta=delta, prune_mass=prune_mass)
    return model.to(device), tokenizer, memory


def _model_cache() -> Path:
    return model_cache_dir()   # the jobs' default: one dequantised copy for everybody


# -- prompts in, answers out -----------------------------------------------------------------
def read_prompts(path: str | os.PathLike) -> list[dict[str, Any]]:
    """JSON Lines: each line an object with a string ``prompt`` (other keys are kept) or a JSON
    string; blank lines are skipped. A bad line is an error naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise GenerationError(f"{path}: cannot read the prompt file ({error})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as error:
            raise GenerationError(f"{path}:{number}: not valid JSON ({error})") from None
        record = {"prompt": value} if isinstance(value, str) else value
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
            raise GenerationError(f"{path}:{number}: expected a JSON object with a non-empty string 'prompt' "
                                  f"(or a JSON string), got {line[:80]!r}")
        records.append(record)
    if not records:
        raise GenerationError(f"{path}: no prompts")
    return records


def write_answers(path: str | os.PathLike, records: Sequence[dict[str, Any]], answers: Sequence[str]) -> Path:
    path = Path(path)
    with path.open("w") as out:
        for record, answer in zip(records, answers):
            out.write(json.dumps({**record, "output": answer}, ensure_ascii=False) + "\n")
    return path


def format_prompt(tokenizer, prompt: str, chat_template: bool = True) -> tuple[str, bool]:
    """(text, whether it is templated): a user turn in the tokenizer's chat template when it has one."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return text, True
    return prompt, False


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 8,
             chat_template: bool = True) -> list[str]:
    """Greedy answers to ``prompts``, in batches padded on the left; only the new tokens are decoded."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens: must be a positive integer, got {max_new_tokens!r}")
    device = next(model.parameters()).device
    model.eval()
    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"   # generation continues from the last real token
    try:
        for start in range(0, len(prompts), batch_size):
            formatted = [format_prompt(tokenizer, p, chat_template) for p in prompts[start:start + batch_size]]
            templated = formatted[0][1]   # the template brings its own special tokens
            batch = tokenizer([text for text, _ in formatted], return_tensors="pt", padding=True,
                              add_special_tokens=not templated).to(device)
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [answer.strip() for answer in answers]
