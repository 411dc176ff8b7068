"""TRACE on the platform: causal LMs, prompt/answer JSON tasks, generation-based task metrics."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moram import load_causal_lm, model_fingerprint
from moram.loading import empty_causal_lm, resolve_model_source
from moram.metrics import summarize

from .. import causal_lm
from ..benchmark import summary_from
from ..causal_lm import DTYPES, SMOLLM2, SMOLLM2_ID
from ..config import ConfigError, JobConfig
from .config import RENAMED_KEYS
from .data import TraceDataError, load_split, validate_tasks
from .evaluate import PROFILES, evaluate_task
from .task_metrics import TASK_METRIC
from .tokenize import TokenizationConfig, TrainingCollator

# TRACE's eight tasks in the paper's order (DESIGN.md), over the project's TRACE-500 copy.
TRACE_500_ORDER = ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]
# What a TRACE sequence reports (DESIGN.md, Metrics): moram.metrics.summarize's keys, kept as named.
DEFAULT_PROFILE = next(iter(PROFILES))  # eval.profile: null takes the first: the official MoRAM code's
SUMMARY = {key: key for key in ("OP", "BWT_signed", "BWT_eq10", "reference_forgetting_magnitude", "FWT")}
# The paper settings a TRACE-format task list can be (data/paper_anchors.csv): the standard CL
# benchmark's 4 and 15 classification tasks (O-LoRA's orders), TRACE's 8 tasks.
PAPER_SETTINGS = {
    "standard-cl-4": frozenset({"dbpedia", "amazon", "yahoo", "agnews"}),
    "standard-cl-15": frozenset({"MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "yelp", "amazon", "SST-2",
                                 "dbpedia", "agnews", "MultiRC", "yahoo"}),
    "trace-8": frozenset(TRACE_500_ORDER),
}


def model_path(config: JobConfig) -> Path:
    """The model the config names: the packaged SmolLM2-135M, a model folder or a GGUF file."""
    return causal_lm.model_path(config.model.source)


def model_cache_dir(config: JobConfig) -> Path:
    return causal_lm.model_cache_dir(config.model.cache_dir)


class TraceBenchmark:
    name = "trace"
    moram_defaults: dict[str, Any] = {}   # MoRAMConfig's own: LLaMA-family attention projections
    # Epochs per task as the official TRACE runner trains them (DESIGN.md).
    config_defaults: dict[str, dict[str, Any]] = {
        "data": {"root": "../shared/datasets/TRACE-500", "tasks": TRACE_500_ORDER},
        "train": {"epochs": [2, 1, 3, 2, 1, 2, 2, 3]}}
    renamed_keys = RENAMED_KEYS

    summary_columns = tuple(SUMMARY.values())
    eval_profiles = tuple(PROFILES)
    data_error = TraceDataError

    @classmethod
    def paper_setting(cls, tasks: list[str]) -> str | None:
        return next((name for name, names in PAPER_SETTINGS.items() if frozenset(tasks) == names), None)

    def __init__(self):
        self._collators: dict[tuple[int, str, str], TrainingCollator] = {}

    # -- the config ----------------------------------------------------------------------------
    def validate_config(self, config: JobConfig) -> list[str]:
        if config.eval.profile is not None and config.eval.profile not in PROFILES:
            return [f"eval.profile: must be one of {list(PROFILES)}, got {config.eval.profile!r}"]
        unknown = sorted(set(config.trace.long_prompt_tasks) - set(TASK_METRIC))   # a typo would be ignored
        if unknown:
            return [f"trace.long_prompt_tasks: names tasks TRACE does not know: {unknown}; known: {sorted(TASK_METRIC)}"]
        return []

    def eval_size(self, config: JobConfig, task: str) -> int:
        """How many examples ``evaluate`` scores ``task`` on (data.eval_split, data.max_eval_examples)."""
        return len(load_split(config.data.root, task, config.data.eval_split, max_examples=config.data.max_eval_examples))

    def eval_profile(self, config: JobConfig) -> str:
        return config.eval.profile or DEFAULT_PROFILE

    def summary(self, matrix: list[list[float]], baseline: list[float] | None, tasks: list[str]) -> dict[str, float]:
        return summary_from(summarize(matrix, baseline=baseline), SUMMARY)

    def validate(self, config: JobConfig) -> None:
        unknown = [task for task in config.data.tasks if task not in TASK_METRIC]
        if unknown:
            raise ConfigError(f"data.tasks: no TRACE metric is defined for {unknown}; tasks with a metric: "
                              f"{sorted(TASK_METRIC)}")
        try:
            resolve_model_source(model_path(config))
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"model.source: {error}") from None
        validate_tasks(config.data.root, config.data.tasks, splits=("train", config.data.eval_split))

    def load_model(self, config: JobConfig) -> tuple[nn.Module, Any]:
        model, tokenizer = load_causal_lm(model_path(config), dtype=DTYPES[config.model.dtype],
                                          cache_dir=model_cache_dir(config))
        if config.trace.pack_training and not keeps_packed_examples_apart(model):
            raise ConfigError(f"trace.pack_training: {type(model).__name__} lets examples packed in one row attend to "
                              f"each other (its attention ignores where positions restart); set "
                              f"trace.pack_training: false to train it on padded batches")
        return model, tokenizer

    def empty_model(self, config: JobConfig) -> nn.Module:
        return empty_causal_lm(model_path(config), dtype=DTYPES[config.model.dtype], cache_dir=model_cache_dir(config))

    def model_ref(self, config: JobConfig) -> tuple[str, str | None]:
        path = model_path(config)
        model_id = config.model.id or (SMOLLM2_ID if config.model.source == SMOLLM2 else str(path))
        return model_id, model_fingerprint(path)

    def train_examples(self, config: JobConfig, task: str) -> list[Any]:
        return load_split(config.data.root, task, "train", max_examples=config.data.max_train_examples)

    def collate(self, config: JobConfig, processor: Any, task: str, examples: list[Any]) -> dict[str, torch.Tensor]:
        key = (id(processor), task, repr(config.trace))   # the budgets and packing are the section's
        if key not in self._collators:  # resolves the tokenizer's BOS habit once per task
            self._collators[key] = TrainingCollator(processor, task, _tokenization(config),
                                                    packed=config.trace.pack_training)
        return self._collators[key](examples)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return answer_token_loss(model, batch)

    def evaluate(self, config: JobConfig, model: nn.Module, processor: Any, task: str,
                 progress: bool = True) -> dict[str, Any]:
        examples = load_split(config.data.root, task, config.data.eval_split,
                              max_examples=config.data.max_eval_examples)
        return evaluate_task(model, processor, examples, task, self.eval_profile(config),
                             max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                             tokenization=_tokenization(config), seed=config.run.seed, progress=progress,
                             share_prefix=config.eval.share_prefix)


def _tokenization(config: JobConfig) -> TokenizationConfig:
    section = config.trace
    return TokenizationConfig(section.max_prompt_tokens, section.max_answer_tokens, dict(section.long_prompt_tasks))


def answer_token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal-LM loss of Hugging Face's ``model(**batch).loss`` -- the mean cross-entropy of
    the answer tokens (labels are -100 elsewhere), each predicted from the position before it --
    with the vocabulary projection computed only at those positions (``logits_to_keep`` as a
    boolean mask). A standard-CL prompt of ~300 tokens has a ~5-token answer: projecting every
    position onto SmolLM2's 49k-token vocabulary, and its log-softmax and backward, was about a
    fifth of a training step's compute for nothing (docs/performance.md)."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    scored = targets != -100
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = scored                         # position t predicts token t + 1
    if "position_ids" in batch:                   # packed (tokenize.pack_for_training): no mask, no cache
        inputs = {"position_ids": batch["position_ids"], "token_mask": batch["token_mask"], "use_cache": False}
    else:
        inputs = {"attention_mask": batch["attention_mask"]}
    logits = model(input_ids=batch["input_ids"], logits_to_keep=keep, **inputs).logits  # [scored, vocabulary]
    return F.cross_entropy(logits.float(), targets[scored])


@torch.no_grad()
def keeps_packed_examples_apart(model: nn.Module) -> bool:
    """Whether ``model`` computes two examples packed in one row (positions restarting at 0, no
    attention mask) as it computes them alone: Hugging Face's causal-mask helpers do for the
    architectures built on them (LLaMA, Gemma, Qwen, ...); one that masks by ``attention_mask``
    only would let packed examples attend to each other, silently. A 7-token forward."""
    first, second = torch.tensor([[11, 12, 13]]), torch.tensor([[21, 22, 23, 24]])
    device = next(model.parameters()).device
    first, second = first.to(device), second.to(device)
    alone = torch.cat([model(input_ids=first, use_cache=False).logits[0],
                       model(input_ids=second, use_cache=False).logits[0]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]], device=device)
    packed = model(input_ids=torch.cat([first, second], dim=1), position_ids=positions, use_cache=False).logits[0]
    # Rounding moves the logits by < 1 % of their range (SmolLM2: 4e-3 in bfloat16, 1e-6 in
    # float32); examples that see each other move them by half of it (0.55 when unmasked).
    alone, packed = alone.float(), packed.float()
    return float((alone - packed).abs().max()) <= 0.05 * float(alone.abs().max())

