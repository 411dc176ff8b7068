"""X-TAIL on the platform: open_clip models, image-folder domains, the union label space.

The Benchmark protocol (``moram_platform.benchmark``) over this package's building blocks, so
that ``jobs/xtail.py`` runs on the same spine as TRACE (Ray Train workers, registry, MLflow):

* a task is a domain (``data.tasks``, in training order); its training set is the saved
  few-shot split (``xtail.shots``, ``xtail.split_seed``), drawn once and reused on every rerun;
* a training step is ``xtail_loss``: image -> text over [seen | current] classes with the seen
  ones masked, plus text -> image, through the model's own forward (DeepSpeed needs that);
* a domain's score is its test accuracy (0-100) when every image is classified among the
  classes of *all* domains of ``data.tasks`` (no domain id at test time), profile "xtail-union".
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import open_clip
import torch
from torch import nn

from moram.loading import files_fingerprint
from moram.metrics import summarize, xtail_per_domain

from ..benchmark import summary_from
from ..config import ConfigError, JobConfig
from .backbone import (XTAIL_TARGET_MODULES, _resolve_pretrained, empty_backbone_model, load_backbone,
                       register_model_config)
from .data import XTAIL_DOMAINS, Domain, DomainError, ImageSamples, load_domain
from .evaluate import class_tokens, count_correct, mean_over_templates, union_text_features
from .loss import text_token_mask, xtail_loss

logger = logging.getLogger(__name__)

PROFILE = "xtail-union"
# What an X-TAIL sequence reports (DESIGN.md, Metrics): summarize's key -> reported name; per-domain
# transfer/<d>, average/<d>, last/<d> come on top.
SUMMARY = {"xtail_transfer": "transfer", "xtail_average": "average", "xtail_last": "last", "OP": "OP",
           "BWT_signed": "BWT_signed", "BWT_eq10": "BWT_eq10"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")  # what load_backbone takes as weights


@dataclass
class XTailProcessor:
    """What goes with the model: open_clip's tokenizer and its train / eval image transforms."""

    tokenizer: Callable[[list[str]], torch.Tensor]
    train_transform: Callable
    eval_transform: Callable
    _tokens: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def class_tokens(self, domain: Domain) -> torch.Tensor:
        """The domain's prompts, tokenized once ([classes * templates, context])."""
        if domain.name not in self._tokens:
            self._tokens[domain.name] = class_tokens(self.tokenizer, domain)
        return self._tokens[domain.name]


class XTailBenchmark:
    name = "xtail"
    # The official X-TAIL settings (XTAIL/runner_moram.sh, loralib/moram.py; DESIGN.md): both CLIP
    # towers' attention (q, k, v, out) and MLP (c_fc, c_proj) projections, r = k = 16, tau 0.01,
    # delta 0.2, no post-pruning, no dropout, scale 1. Scale 1 is alpha = r: a config that sets
    # moram.r to another value must set moram.alpha too (validate_config says so), since a fixed
    # default alpha would no longer be r.
    moram_defaults: dict[str, Any] = {"target_modules": list(XTAIL_TARGET_MODULES), "r": 16, "k": 16, "tau": 0.01,
                                      "delta": 0.2, "prune_mass": None, "dropout": 0.0, "alpha": 16.0}
    # The ten domains in the official order; 500 iterations per domain (XTAIL/runner_moram.sh).
    # data.root has no default: where the user keeps the images.
    renamed_keys: dict[str, str] = {}
    config_defaults: dict[str, dict[str, Any]] = {"data": {"tasks": list(XTAIL_DOMAINS)},
                                                  "train": {"epochs": None, "max_steps": 500}}

    summary_columns = tuple(SUMMARY.values())
    eval_profiles = (PROFILE,)
    data_error = DomainError

    @classmethod
    def paper_setting(cls, tasks: list[str]) -> str | None:
        return "xtail-10" if frozenset(tasks) == frozenset(XTAIL_DOMAINS) else None   # data/paper_anchors.csv

    def __init__(self):
        self._domains: dict[str, Domain] = {}
        self._text: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _TextCache

    # -- the config (Benchmark protocol) ---------------------------------------------------
    def validate_config(self, config: JobConfig) -> list[str]:
        try:
            _check_config(config)
        except ConfigError as error:
            return [str(error)]
        return _scale_problems(config.moram)

    def eval_profile(self, config: JobConfig) -> str:
        return PROFILE  # one profile: every domain scored over the union label space

    def summary(self, matrix: list[list[float]], baseline: list[float] | None, tasks: list[str]) -> dict[str, float]:
        return {**summary_from(summarize(matrix, baseline=baseline), SUMMARY), **xtail_per_domain(matrix, tasks)}

    # -- checks, before Ray starts ---------------------------------------------------------
    def validate(self, config: JobConfig) -> None:
        _check_config(config)
        check_backbone(config)
        for name in config.data.tasks:  # opens every image the run will read; writes nothing yet
            _load_domain(config, name, verify_images=True, save_split=False)
        for name in config.data.tasks:  # all good: newly drawn splits are saved (the same draw)
            self._domains[name] = _load_domain(config, name, verify_images=False)

    # -- model -----------------------------------------------------------------------------
    def load_model(self, config: JobConfig) -> tuple[nn.Module, XTailProcessor]:
        _register_model_config(config)
        backbone = load_backbone(config.model.source, config.xtail.pretrained,
                                 allow_random_init=config.xtail.allow_random_init, init_seed=config.run.seed,
                                 cache_dir=config.model.cache_dir)
        return _without_scalar_parameters(backbone.model), XTailProcessor(
            backbone.tokenizer, backbone.train_transform, backbone.eval_transform)

    def empty_model(self, config: JobConfig) -> nn.Module:
        check_backbone(config, warn=False)    # what load_backbone would refuse, named by key
        return _without_scalar_parameters(empty_backbone_model(config.model.source))

    def model_ref(self, config: JobConfig) -> tuple[str, str | None]:
        source, pretrained = config.model.source, config.xtail.pretrained
        folder = _local_dir(source)
        if folder is not None and _has_weights(folder):
            model_id, revision = f"open_clip:{source}", files_fingerprint(*_weight_files(folder))
        elif pretrained is None:  # random init: the architecture and the seed make the weights
            _register_model_config(config)
            architecture = json.dumps(open_clip.get_model_config(source) or {}, sort_keys=True)
            model_id = f"open_clip:{source} (random init, seed {config.run.seed})"
            revision = hashlib.sha256(f"{architecture}|{config.run.seed}".encode()).hexdigest()[:16]
        elif Path(pretrained).is_file():
            model_id, revision = f"open_clip:{source} ({Path(pretrained).name})", files_fingerprint(Path(pretrained))
        else:
            model_id, revision = f"open_clip:{source} pretrained={pretrained}", None
        return config.model.id or model_id, revision

    # -- training --------------------------------------------------------------------------
    def domain(self, config: JobConfig, name: str) -> Domain:
        """A domain of the run, loaded once per process (the driver already checked its images)."""
        if name not in self._domains:
            self._domains[name] = _load_domain(config, name, verify_images=False)
        return self._domains[name]

    def train_examples(self, config: JobConfig, task: str) -> list[tuple[Path, int]]:
        return list(self.domain(config, task).train)

    def num_seen(self, config: JobConfig, task: str) -> int:
        """Classes of the domains trained before ``task``: in the label space, masked in the loss."""
        before = config.data.tasks[: config.data.tasks.index(task)]
        return sum(self.domain(config, name).num_classes for name in before)

    def collate(self, config: JobConfig, processor: XTailProcessor, task: str,
                examples: list[tuple[Path, int]]) -> dict[str, Any]:
        domain = self.domain(config, task)
        samples = ImageSamples(examples, processor.train_transform)
        return {"images": torch.stack([samples[i][0] for i in range(len(samples))]),
                "labels": torch.tensor([label for _, label in examples]),
                "tokens": processor.class_tokens(domain),
                "templates_per_class": len(domain.templates),
                "num_seen": self.num_seen(config, task)}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """``xtail_loss`` through ``model(image=, text=)``: the engine's forward, which DeepSpeed
        needs to run (its ZeRO hooks), instead of the encoders called one by one."""
        dtype = next(model.parameters()).dtype  # DeepSpeed's bf16 casts the model, not the batch
        tokens = batch["tokens"]
        # The prompts' padding counts in no activation statistic. The mask [prompts, context]
        # applies to the layers whose input is [prompts, context, width]: the text tower's.
        with _token_mask(model, text_token_mask(tokens)):
            image_features, prompt_features, scale = _clip_outputs(model(image=batch["images"].to(dtype),
                                                                         text=tokens))
        text_features = mean_over_templates(prompt_features.float(), batch["templates_per_class"])
        return xtail_loss(image_features.float(), text_features, scale.float(), batch["labels"], batch["num_seen"])

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, config: JobConfig, model: nn.Module, processor: XTailProcessor, task: str,
                 progress: bool = True) -> dict[str, Any]:
        """Accuracy on ``task``'s test images (``data.max_eval_examples`` caps them, evenly spread
        over the sorted list), each classified among the classes of every domain of the run."""
        domains = [self.domain(config, name) for name in config.data.tasks]
        index = config.data.tasks.index(task)
        samples = capped(domains[index].test, config.data.max_eval_examples)
        was_training = model.training
        model.eval()  # δ applies
        try:
            text = self._union_text(model, processor, domains)
            offset = sum(domain.num_classes for domain in domains[:index])
            correct = count_correct(model, samples, text, offset, processor.eval_transform, config.eval.batch_size)
        finally:
            model.train(was_training)
        return {"task": task, "metric": "accuracy", "score": 100.0 * correct / len(samples), "n": len(samples),
                "correct": correct, "classes": int(text.shape[0]), "profile": PROFILE}

    def _union_text(self, model: nn.Module, processor: XTailProcessor, domains: Sequence[Domain]) -> torch.Tensor:
        """The union label space's text features, computed once per model state: the next task's
        evaluation of the same model reuses them; any change to the model recomputes them."""
        names = tuple(domain.name for domain in domains)
        cached = self._text.get(model)
        if cached is None or not cached.matches(model, names):
            cached = _TextCache(names, _state_of(model), union_text_features(model, domains, processor.tokenizer))
            self._text[model] = cached
        return cached.features


# -- the text-feature cache ----------------------------------------------------------------------
@dataclass
class _TextCache:
    domains: tuple[str, ...]
    state: list
    features: torch.Tensor

    def matches(self, model: nn.Module, domains: tuple[str, ...]) -> bool:
        return domains == self.domains and _same_state(self.state, _state_of(model))


def _state_of(model: nn.Module) -> list:
    """Everything text features depend on: each parameter and buffer (the same object, storage and
    in-place version: a frozen bank is a buffer, replaced when other shards are loaded) and the
    routing knobs (k, τ, δ) of every MoRAM layer."""
    tensors = [*model.parameters(), *model.buffers()]
    parameters = [(weakref.ref(p), p.data_ptr(), p._version) for p in tensors]
    routing = [(m.k, m.tau, m.delta) for m in model.modules() if all(hasattr(m, a) for a in ("k", "tau", "delta"))]
    return [parameters, routing]


def _same_state(old: list, new: list) -> bool:
    (old_params, old_routing), (new_params, new_routing) = old, new
    return old_routing == new_routing and len(old_params) == len(new_params) and all(
        a[0]() is not None and a[0]() is b[0]() and a[1:] == b[1:] for a, b in zip(old_params, new_params))


# -- helpers -------------------------------------------------------------------------------------
def _token_mask(model: nn.Module, mask: torch.Tensor):
    """``MoRAMModel.token_mask`` of ``model`` or of the MoRAMModel an engine wraps (DeepSpeed and
    DDP keep it as ``.module``); a plain model (no atoms, no statistics) needs none."""
    while not hasattr(type(model), "token_mask") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model.token_mask(mask) if hasattr(type(model), "token_mask") else contextlib.nullcontext()


def _without_scalar_parameters(model: nn.Module) -> nn.Module:
    """0-dim parameters (CLIP's logit_scale, SigLIP's logit_bias) as shape [1], same values:
    DeepSpeed broadcasts every parameter as bytes at start-up, which a 0-dim tensor cannot be
    viewed as. Every use of them broadcasts, so nothing else changes."""
    for name, parameter in list(model.named_parameters()):
        if parameter.dim() == 0:
            owner_name, _, attribute = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(owner, attribute, nn.Parameter(parameter.detach().reshape(1),
                                                   requires_grad=parameter.requires_grad))
    return model


def capped(samples: Sequence, limit: int | None) -> list:
    """At most ``limit`` samples, evenly spaced over the list (every class keeps its share)."""
    if limit is None or limit >= len(samples):
        return list(samples)
    return [samples[i * len(samples) // limit] for i in range(limit)]


def _clip_outputs(output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unit image features, unit prompt features, exp(logit scale)) of an open_clip forward."""
    if isinstance(output, dict):
        return output["image_features"], output["text_features"], output["logit_scale"]
    return output[0], output[1], output[2]


def domain_source(config: JobConfig, name: str) -> str:
    """xtail.domain_sources[name], else <data.root>/<name> (a folder or s3:// prefix)."""
    if name in config.xtail.domain_sources:
        return config.xtail.domain_sources[name]
    root = config.data.root
    return f"{root.rstrip('/')}/{name}" if "://" in root else str(Path(root) / name)


def _load_domain(config: JobConfig, name: str, verify_images: bool, save_split: bool = True) -> Domain:
    xtail = config.xtail
    return load_domain(name, domain_source(config, name), shots=xtail.shots, seed=xtail.split_seed,
                       templates=xtail.templates.get(name), split_dir=xtail.split_dir, cache_dir=xtail.cache_dir,
                       verify_images=verify_images, save_split=save_split)


def _scale_problems(moram: dict[str, Any]) -> list[str]:
    """X-TAIL's scale is 1 (alpha = r). The default alpha is the default r's; another r needs its alpha."""
    r = moram.get("r", XTailBenchmark.moram_defaults["r"])
    if "alpha" in moram or r == XTailBenchmark.moram_defaults["alpha"]:
        return []
    return [f"moram.alpha: X-TAIL trains at scale 1 (alpha = r, the official code's); moram.r is {r!r}, so set "
            f"moram.alpha: {r!r} too (or another alpha, on purpose), got the default alpha "
            f"{XTailBenchmark.moram_defaults['alpha']!r}"]


def _check_config(config: JobConfig) -> None:
    xtail, tasks = config.xtail, config.data.tasks
    if config.model.dtype != "float32":
        raise ConfigError(f"model.dtype: X-TAIL loads open_clip weights in float32 (train.precision=bf16 "
                          f"trains in bf16), got {config.model.dtype!r}")
    if config.data.max_train_examples is not None:
        raise ConfigError("data.max_train_examples: not used by X-TAIL, whose training set is the few-shot "
                          "split; set xtail.shots instead")
    for key in ("domain_sources", "templates"):
        unknown = sorted(set(getattr(xtail, key)) - set(tasks))
        if unknown:
            raise ConfigError(f"xtail.{key}: names domains that are not in data.tasks: {unknown}")
    for name, templates in xtail.templates.items():
        if not templates:
            raise ConfigError(f"xtail.templates.{name}: must list at least one template")
        for template in templates:   # the data loader checks it too; here the key is named
            if template.count("{}") != 1:
                raise ConfigError(f"xtail.templates.{name}: {template!r} must contain exactly one '{{}}' (the "
                                  f"class name)")


def check_backbone(config: JobConfig, warn: bool = True) -> None:
    """What ``load_backbone`` would refuse, without building the model; errors name the key
    (``warn``: say so when the model will be randomly initialised)."""
    source, xtail = config.model.source, config.xtail
    _register_model_config(config)
    if source.startswith("hf-hub:"):
        raise ConfigError(f"model.source: {source!r}: 'hf-hub:' models are downloaded by open_clip and this "
                          f"platform never downloads; save the model and use 'local-dir:<folder>'")
    folder = _local_dir(source)
    if folder is not None:
        if not folder.is_dir():
            raise ConfigError(f"model.source: folder {folder} does not exist")
        if xtail.pretrained is not None:
            raise ConfigError(f"xtail.pretrained: a 'local-dir:' model takes its weights from its folder; "
                              f"{xtail.pretrained!r} would be ignored")
        random_init = not _has_weights(folder)
    elif source not in open_clip.list_models():
        raise ConfigError(f"model.source: {source!r} is not an open_clip model (e.g. ViT-B-16); define a new "
                          f"architecture with xtail.model_config")
    else:
        random_init = xtail.pretrained is None
    if random_init and not xtail.allow_random_init:
        raise ConfigError(f"xtail.pretrained: no pretrained weights for {source!r}; set xtail.pretrained to a "
                          f"cached open_clip tag or a checkpoint file, or set xtail.allow_random_init=true to "
                          f"train a randomly initialised model (tests and benchmarks only)")
    if random_init:
        if warn:
            logger.warning("model %s is randomly initialised (xtail.allow_random_init): its accuracies say "
                           "nothing about CLIP", source)
    elif folder is None:
        try:
            _resolve_pretrained(source, xtail.pretrained, config.model.cache_dir)
        except FileNotFoundError as error:
            raise ConfigError(f"xtail.pretrained: {error}") from None


def _register_model_config(config: JobConfig) -> None:
    """xtail.model_config becomes loadable as model.source (in every process that builds it)."""
    if config.xtail.model_config is None:
        return
    try:
        register_model_config(config.model.source, config.xtail.model_config)
    except ValueError as error:
        raise ConfigError(f"xtail.model_config: {error}") from None


def _local_dir(source: str) -> Path | None:
    return Path(source.removeprefix("local-dir:")) if source.startswith("local-dir:") else None


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and bool(_weight_files(folder))
