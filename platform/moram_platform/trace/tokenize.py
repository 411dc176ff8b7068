"""TRACE tokenisation, as the reference: no chat template, prompt + answer, loss on the answer.

One example is ``[bos?] prompt answer [eos]``:

- the prompt is cut from the LEFT to ``max_prompt_tokens`` (1024; MeetingBank 4096): its end,
  the question and the answer cue, is what the model needs. MeetingBank's prompt is cut on the
  RIGHT instead, as the official MoRAM collator does (truncation_side "right" for MeetingBank):
  the instruction and the transcript's start are kept, its end and the "Summary:" cue are lost;
- the answer is cut on the right to ``max_answer_tokens`` (512) and gets EOS when it fits
  whole (a truncated answer did not end there, so it does not learn to stop there);
- labels are -100 on the prompt and on padding: the loss is on answer tokens only.

Training batches are padded on the RIGHT (left padding in training gave NaN losses on SmolLM2
under SDPA: fully masked rows); generation batches on the LEFT, so every row's last token is
its prompt's last token. Either way each example's real tokens are the same sequence. Packed
training batches (``trace.pack_training``, the default) hold the same examples in fewer rows,
each example still seeing only itself (``pack_for_training``).
Works with any Hugging Face tokenizer; one without a pad token pads with EOS.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from .data import TraceExample

IGNORE_INDEX = -100  # labels that the cross-entropy loss skips

__all__ = [
    "GenerationCollator", "IGNORE_INDEX", "TokenizationConfig", "TokenizedExample", "TrainingCollator",
    "encode_answer", "encode_prompt", "pack_for_training", "pad_for_generation", "pad_for_training", "pad_token_id",
    "tokenize_example", "tokenizer_adds_bos",
]


@dataclass(frozen=True)
class TokenizationConfig:
    """Length limits in tokens (the reference TRACE settings by default)."""

    max_prompt_tokens: int = 1024
    max_answer_tokens: int = 512
    long_prompt_tasks: Mapping[str, int] = field(default_factory=lambda: {"MeetingBank": 4096})
    add_bos: bool | None = None  # None: do what the tokenizer does by default
    keep_start_tasks: frozenset[str] = frozenset({"MeetingBank"})  # prompts cut on the right

    def __post_init__(self):
        limits = {"max_prompt_tokens": self.max_prompt_tokens, "max_answer_tokens": self.max_answer_tokens,
                  **{f"long_prompt_tasks.{task}": n for task, n in self.long_prompt_tasks.items()}}
        for key, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: must be a positive integer, got {value!r}")
        if isinstance(self.keep_start_tasks, str) or not all(isinstance(t, str) for t in self.keep_start_tasks):
            raise ValueError(f"keep_start_tasks: must be a collection of task names, got {self.keep_start_tasks!r}")

    def prompt_limit(self, task: str | None = None) -> int:
        return self.long_prompt_tasks.get(task, self.max_prompt_tokens)

    def keeps_prompt_start(self, task: str | None = None) -> bool:
        return task in self.keep_start_tasks


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: list[int]
    answer_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.answer_ids

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * len(self.prompt_ids) + self.answer_ids


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, else its EOS (decoder-only models rarely define a pad)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError(f"{type(tokenizer).__name__}: has neither a pad nor an EOS token to pad with")


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text by default (Llama-2 does, SmolLM2 not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def _text_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer, prompt: str, max_tokens: int, add_bos: bool = False,
                  keep_start: bool = False) -> list[int]:
    """The prompt's token ids cut to ``max_tokens`` (BOS, if any, stays first): from the left,
    or with ``keep_start`` on the right."""
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    room = max_tokens - len(bos)
    if room < 1:
        raise ValueError(f"max_prompt_tokens: {max_tokens} leaves no room for the prompt after BOS")
    ids = _text_ids(tokenizer, prompt)
    return bos + (ids[:room] if keep_start else ids[-room:])


def encode_answer(tokenizer, answer: str, max_tokens: int) -> list[int]:
    """The answer's token ids cut on the right to ``max_tokens``, with EOS when it fits whole."""
    ids = _text_ids(tokenizer, answer)
    if len(ids) < max_tokens and tokenizer.eos_token_id is not None:
        return ids + [tokenizer.eos_token_id]
    return ids[:max_tokens]


def _as_example(example) -> TraceExample:
    if isinstance(example, TraceExample):
        return example
    return TraceExample(prompt=example["prompt"], answer=example["answer"])


def _prompt_of(example) -> str:
    if isinstance(example, str):
        return example
    return example.prompt if isinstance(example, TraceExample) else example["prompt"]


def tokenize_example(tokenizer, example, config: TokenizationConfig = TokenizationConfig(),
                     task: str | None = None) -> TokenizedExample:
    """One training example (a ``TraceExample`` or a ``{"prompt", "answer"}`` mapping)."""
    example = _as_example(example)
    add_bos = tokenizer_adds_bos(tokenizer) if config.add_bos is None else config.add_bos
    return TokenizedExample(
        prompt_ids=encode_prompt(tokenizer, example.prompt, config.prompt_limit(task), add_bos,
                                 config.keeps_prompt_start(task)),
        answer_ids=encode_answer(tokenizer, example.answer, config.max_answer_tokens),
    )


def _padded_length(lengths: Sequence[int], multiple_of: int | None) -> int:
    longest = max(lengths)
    if multiple_of:
        longest = -(-longest // multiple_of) * multiple_of
    return longest


def pad_for_training(examples: Sequence[TokenizedExample], pad_id: int,
                     pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` [batch, length], padded on the RIGHT."""
    if not examples:
        raise ValueError("pad_for_training: empty batch")
    length = _padded_length([len(e.input_ids) for e in examples], pad_to_multiple_of)
    input_ids, attention_mask, labels = [], [], []
    for example in examples:
        pad = length - len(example.input_ids)
        input_ids.append(example.input_ids + [pad_id] * pad)
        attention_mask.append([1] * len(example.input_ids) + [0] * pad)
        labels.append(example.labels + [IGNORE_INDEX] * pad)
    return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention_mask),
            "labels": torch.tensor(labels)}


def pack_for_training(examples: Sequence[TokenizedExample], pad_id: int,
                      pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """``input_ids``, ``position_ids``, ``labels``, ``token_mask`` [rows, length]: the examples
    packed first-fit-decreasing into as few rows as hold them, each row as long as the longest
    example (padded as ``pad_for_training`` would pad it), so no row is longer than the padded
    batch and none computes attention over more positions.

    Each example's positions restart at 0, which is how Hugging Face's masks tell packed
    sequences apart (``masking_utils.find_packed_sequence_indices``: a block-diagonal causal mask,
    when the model is called with ``position_ids``, no ``attention_mask`` and no cache): every
    token sees exactly what it sees padded, so the loss and its gradients are the padded batch's
    (to float rounding) for less compute. A row's unused tail is a sequence of its own (positions
    from 0, pad tokens, labels -100, ``token_mask`` 0): it sees no example and no example sees it.
    Only the answer tokens are scored, and an example's first token is a prompt token, so no
    position predicts the next example's first token."""
    if not examples:
        raise ValueError("pack_for_training: empty batch")
    length = _padded_length([len(e.input_ids) for e in examples], pad_to_multiple_of)
    return _packed_batch(_pack_rows(examples, length), length, pad_id)


def _pack_rows(examples: Sequence[TokenizedExample], length: int) -> list[list[TokenizedExample]]:
    """First fit, longest first, into rows of ``length`` tokens."""
    rows: list[list[TokenizedExample]] = []
    free: list[int] = []
    for example in sorted(examples, key=lambda e: -len(e.input_ids)):
        row = next((i for i, room in enumerate(free) if room >= len(example.input_ids)), None)
        if row is None:
            rows.append([])
            free.append(length)
            row = len(rows) - 1
        rows[row].append(example)
        free[row] -= len(example.input_ids)
    return rows


def _packed_batch(rows: list[list[TokenizedExample]], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    free = [length - sum(len(e.input_ids) for e in row) for row in rows]
    input_ids, position_ids, labels, token_mask = [], [], [], []
    for row, room in zip(rows, free):
        input_ids.append([t for e in row for t in e.input_ids] + [pad_id] * room)
        position_ids.append([p for e in row for p in range(len(e.input_ids))] + list(range(room)))
        labels.append([t for e in row for t in e.labels] + [IGNORE_INDEX] * room)
        token_mask.append([1] * (length - room) + [0] * room)
    return {"input_ids": torch.tensor(input_ids), "position_ids": torch.tensor(position_ids),
            "labels": torch.tensor(labels), "token_mask": torch.tensor(token_mask)}


def pad_for_generation(prompts: Sequence[Sequence[int]], pad_id: int,
                       pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` [batch, length] of prompts, padded on the LEFT."""
    if not prompts:
        raise ValueError("pad_for_generation: empty batch")
    length = _padded_length([len(p) for p in prompts], pad_to_multiple_of)
    input_ids = [[pad_id] * (length - len(p)) + list(p) for p in prompts]
    attention_mask = [[0] * (length - len(p)) + [1] * len(p) for p in prompts]
    return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention_mask)}


class _Collator:
    def __init__(self, tokenizer, task: str | None = None, config: TokenizationConfig = TokenizationConfig(),
                 pad_to_multiple_of: int | None = None):
        self.tokenizer = tokenizer
        self.task = task
        # Resolve the tokenizer's BOS habit once, not per example.
        add_bos = tokenizer_adds_bos(tokenizer) if config.add_bos is None else config.add_bos
        self.config = replace(config, add_bos=add_bos)
        self.pad_id = pad_token_id(tokenizer)
        self.pad_to_multiple_of = pad_to_multiple_of


class TrainingCollator(_Collator):
    """``collate_fn`` for training: examples -> right-padded input_ids, attention_mask, labels,
    or with ``packed`` the same examples packed (``pack_for_training``) where that saves a row;
    a batch that packs into as many rows as it has examples is padded (the same work without
    the block mask; pairs, as the quickstart's, never pack)."""

    def __init__(self, tokenizer, task: str | None = None, config: TokenizationConfig = TokenizationConfig(),
                 pad_to_multiple_of: int | None = None, packed: bool = False):
        super().__init__(tokenizer, task, config, pad_to_multiple_of)
        self.packed = packed

    def __call__(self, batch: Sequence[TraceExample | Mapping[str, str]]) -> dict[str, torch.Tensor]:
        tokenized = [tokenize_example(self.tokenizer, e, self.config, self.task) for e in batch]
        if self.packed and tokenized:
            length = _padded_length([len(e.input_ids) for e in tokenized], self.pad_to_multiple_of)
            rows = _pack_rows(tokenized, length)
            if len(rows) < len(tokenized):
                return _packed_batch(rows, length, self.pad_id)
        return pad_for_training(tokenized, self.pad_id, self.pad_to_multiple_of)


class GenerationCollator(_Collator):
    """``collate_fn`` for generation: examples (or prompt strings) -> left-padded prompts only."""

    def __call__(self, batch: Sequence[TraceExample | Mapping[str, str] | str]) -> dict[str, torch.Tensor]:
        return self.pad(self.encode(batch))

    def encode(self, batch: Sequence[TraceExample | Mapping[str, str] | str]) -> list[list[int]]:
        """Each prompt's token ids, cut to the task's limit (BOS first where the tokenizer adds one)."""
        limit, keep_start = self.config.prompt_limit(self.task), self.config.keeps_prompt_start(self.task)
        return [encode_prompt(self.tokenizer, _prompt_of(e), limit, self.config.add_bos, keep_start) for e in batch]

    def pad(self, encoded: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        return pad_for_generation(encoded, self.pad_id, self.pad_to_multiple_of)
