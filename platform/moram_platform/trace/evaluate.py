"""Evaluate a causal LM on a TRACE task under a named, recorded evaluation profile.

A profile is a decoding recipe plus a set of scoring rules (``task_metrics.SCORINGS``):

- ``"moram-repo"``: the official MoRAM code (TRACE/inference/infer_part.py: greedy, repetition
  penalty 1.2, no repeated 3-gram; its scoring, quirks included: see ``task_metrics``);
- ``"trace"``: TRACE's original (inference/infer_*.py: sampling at temperature 0.1 with the HF
  defaults top-k 50, top-p 1.0; whole-string exact match);
- ``"lenient"``: moram-repo's decoding with a cleaned scoring that finds the answer inside a
  chattier generation (first choice letter or stance word, first number, first line).

Both official codes generate up to 512 new tokens (their runner scripts' ``--max_ans_len``) and
stop at EOS; so do we, for every row of a batch (a finished row is padded until all are done).
Every result records its profile: scores from different profiles are not comparable.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import TraceExample
from .task_metrics import SCORINGS, TASK_METRIC, score_task
from .tokenize import GenerationCollator, TokenizationConfig

__all__ = ["MAX_NEW_TOKENS", "PROFILES", "EvaluationProfile", "evaluate_task", "generate_answers", "get_profile"]

MAX_NEW_TOKENS = 512  # both official runners: --max_ans_len 512
# A batch's common prompt start (the task's instruction and options list: 25-60 SmolLM2 tokens
# for the standard-CL tasks) is computed once and shared through the KV cache when it is at least
# this long; below, the extra forward call costs about what it saves.
MIN_SHARED_PREFIX = 16


@dataclass(frozen=True)
class EvaluationProfile:
    name: str
    generation: Mapping[str, Any]  # keyword arguments for model.generate
    scoring: str  # the scoring rules, one of task_metrics.SCORINGS
    description: str

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise ValueError(f"profile {self.name!r}: scoring must be one of {', '.join(SCORINGS)}, "
                             f"got {self.scoring!r}")


_GREEDY_NO_REPEAT = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.2, "no_repeat_ngram_size": 3}

PROFILES: dict[str, EvaluationProfile] = {
    "moram-repo": EvaluationProfile(
        name="moram-repo",
        generation=dict(_GREEDY_NO_REPEAT),
        scoring="moram-repo",
        description="official MoRAM code: greedy, repetition penalty 1.2, no-repeat 3-gram; its scoring, quirks included",
    ),
    "trace": EvaluationProfile(
        name="trace",
        generation={"do_sample": True, "temperature": 0.1, "top_k": 50, "top_p": 1.0},
        scoring="trace",
        description="TRACE original: sampling at temperature 0.1, exact-match answers",
    ),
    "lenient": EvaluationProfile(
        name="lenient",
        generation=dict(_GREEDY_NO_REPEAT),
        scoring="lenient",
        description="moram-repo decoding, cleaned scoring: the answer found inside a chattier generation",
    ),
    # O-LoRA (cmnfriend/O-LoRA) src/run_uie_lora.py:168-180, 554-568: greedy, one beam, repetition
    # penalty 1.0; its scripts generate 50 new tokens (--generation_max_length 50: eval.max_new_tokens).
    "olora": EvaluationProfile(
        name="olora",
        generation={"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0},
        scoring="olora",
        description="O-LoRA's standard-CL protocol: greedy decoding, exact match after its normalisation",
    ),
}


def get_profile(profile: str | EvaluationProfile) -> EvaluationProfile:
    if isinstance(profile, EvaluationProfile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"profile: unknown evaluation profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[profile]


def _device_of(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


def _prompt_of(example) -> str:
    return example.prompt if isinstance(example, TraceExample) else example["prompt"]


def _answer_of(example) -> str:
    return example.answer if isinstance(example, TraceExample) else example["answer"]


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], profile: str | EvaluationProfile, *,
                     task: str | None = None, max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 8,
                     tokenization: TokenizationConfig = TokenizationConfig(), seed: int | None = None,
                     progress: bool = True, share_prefix: bool = True) -> list[str]:
    """Generate for each prompt (left-padded batches) and decode only the new tokens.

    ``model`` is any HF causal LM, or a wrapper exposing ``.generate`` with HF semantics
    (returns prompt + new tokens). ``seed`` seeds torch's global RNG (the "trace" profile samples).
    A batch stops when every row has produced EOS (finished rows get the pad token, which is
    not decoded), so short answers cost a few steps however large ``max_new_tokens`` is.

    Batches are cut from the prompts ordered by token length, longest first (a too-long batch
    fails at once), and the answers come back in the order of ``prompts``: a batch of similar
    lengths pads little, and padding is computed like any token (SST-2, AG News and DBpedia,
    50 prompts each in batches of 25: 21.5k prompt tokens computed in file order, 18.2k in
    length order, for 14.1k real ones; in batches of 8: 18.9k and 14.8k). Each row sees the
    same tokens either way (left padding is masked); under the sampling profile the random
    draws fall on other rows than in file order.

    ``share_prefix``: the tokens every prompt of a batch starts with are run once, at batch 1, and
    their KV cache is repeated over the batch; each row is then [prefix, padding, rest of its
    prompt] with the padding masked (positions follow the mask, so each row sees the positions
    and keys it would left-padded). On the quickstart's DBpedia prompts (58 shared tokens of
    98-182) batches of 8 generated in 0.54x the time, one thread, the same answers. Only for
    models that return a KV cache (Hugging Face causal LMs and MoRAMModel), and not under a
    profile that bans repeated n-grams (moram-repo, lenient): those read the token sequence
    itself, which the moved padding changes where the prompt is split.
    """
    profile = get_profile(profile)
    for key, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}: must be a positive integer, got {value!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__}: has no EOS token, so generation could not stop "
                         f"before max_new_tokens ({max_new_tokens})")
    collate = GenerationCollator(tokenizer, task=task, config=tokenization)
    device = _device_of(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    answers = [""] * len(prompts)   # filled in the order of ``prompts``
    try:
        with tqdm(total=len(prompts), desc=f"{task or 'generate'} [{profile.name}]", unit="ex",
                  disable=not progress) as bar:
            encoded = collate.encode(list(prompts))
            order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))   # stable: ties keep file order
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                prompts_in_batch = [encoded[i] for i in rows]
                sharing = share_prefix and _has_kv_cache(model) and _layout_free(profile)
                shared = _shared_prefix(prompts_in_batch) if sharing else 0
                if shared >= MIN_SHARED_PREFIX:
                    batch = _pad_after_prefix(prompts_in_batch, shared)
                    batch["cache"] = _prefix_cache(model, prompts_in_batch[0][:shared], len(rows), device)
                else:
                    batch = collate.pad(prompts_in_batch)
                output = model.generate(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    max_new_tokens=max_new_tokens, pad_token_id=collate.pad_id,
                    eos_token_id=tokenizer.eos_token_id, **({"cache": batch["cache"]} if "cache" in batch else {}),
                    **profile.generation,
                )
                new_tokens = output[:, batch["input_ids"].shape[1]:]
                decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                for row, answer in zip(rows, decoded):
                    answers[row] = answer
                bar.update(len(new_tokens))
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return answers


def _shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all prompts share, leaving every prompt at least one of its own
    (generation continues from each row's last token)."""
    if len(prompts) < 2:
        return 0
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    shared = 0
    while shared < limit and all(p[shared] == first[shared] for p in prompts):
        shared += 1
    return shared


def _has_kv_cache(model) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "use_cache", False)) and callable(getattr(model, "forward", None))


def _layout_free(profile: EvaluationProfile) -> bool:
    """Whether the profile's decoding depends on the prompt only through the model (and the set
    of its tokens), not on where padding sits in the token sequence."""
    return not profile.generation.get("no_repeat_ngram_size")


def _pad_after_prefix(prompts: Sequence[Sequence[int]], shared: int) -> dict[str, torch.Tensor]:
    """[prefix, padding, rest] per row, the padding masked: the prompts' own tokens end together.
    The padding repeats the row's first token: Hugging Face's repetition penalty skips only
    left padding, so a filler from the prompt itself leaves the penalised set as it was (a pad
    token, often EOS, would be penalised)."""
    length = max(len(p) for p in prompts)
    input_ids, attention_mask = [], []
    for prompt in prompts:
        gap = length - len(prompt)
        input_ids.append(list(prompt[:shared]) + [prompt[0]] * gap + list(prompt[shared:]))
        attention_mask.append([1] * shared + [0] * gap + [1] * (len(prompt) - shared))
    return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention_mask)}


def _prefix_cache(model, prefix: Sequence[int], rows: int, device: torch.device):
    """The KV cache of ``prefix`` run once, repeated for ``rows`` rows; generate continues it."""
    ids = torch.tensor([list(prefix)], device=device)
    cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).cache  # the cache is what is used
    cache.batch_repeat_interleave(rows)
    return cache


def evaluate_task(model, tokenizer, examples: Sequence[TraceExample | Mapping[str, str]], task: str,
                  profile: str | EvaluationProfile, *, max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 8,
                  tokenization: TokenizationConfig = TokenizationConfig(), seed: int | None = None,
                  progress: bool = True, share_prefix: bool = True) -> dict[str, Any]:
    """``{"task", "metric", "score" (0-100), "profile", "n"}`` for ``model`` on ``examples``."""
    if task not in TASK_METRIC:
        raise ValueError(f"task: no TRACE metric for {task!r}; known tasks: {', '.join(TASK_METRIC)}")
    if not examples:
        raise ValueError(f"{task}: no examples to evaluate")
    profile = get_profile(profile)
    prompts = [_prompt_of(e) for e in examples]
    predictions = generate_answers(model, tokenizer, prompts, profile, task=task, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, tokenization=tokenization, seed=seed, progress=progress,
                                   share_prefix=share_prefix)
    # SARI's source is the prompt, as in TRACE's 20Minuten evaluation.
    score = score_task(task, predictions, [_answer_of(e) for e in examples], sources=prompts,
                       scoring=profile.scoring)
    return {"task": task, "metric": TASK_METRIC[task], "score": score, "profile": profile.name, "n": len(examples)}
