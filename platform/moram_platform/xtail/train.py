"""Training one X-TAIL domain: a plain single-process loop around a pure per-step loss.

The loss (``xtail_loss``) has the reference's two terms:
* image -> text: cross-entropy over the logits of [seen classes | current classes], the seen
  (earlier domains') columns set to -inf. The label space is the union, but only the current
  domain's classes compete, so training does not push old domains' prompts around.
* text -> image: each class present in the batch against the batch's images, its target spread
  evenly over the images of that class (the CLIP term in a form that stays well-defined when a
  class repeats in the batch, as it does with 16 shots and batch 64).

``train_domain`` owns the optimizer (AdamW, fresh per task), the cosine schedule and the data
order; it has no Ray in it, so a Ray Train worker can call it and a DeepSpeed engine can reuse
``xtail_loss`` for its own step.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from moram import MoRAMConfig

from .backbone import XTAIL_TARGET_MODULES
from .data import Domain, ImageSamples
from .evaluate import class_text_features, class_tokens

logger = logging.getLogger(__name__)


@dataclass
class XTailSettings:
    """X-TAIL defaults of the reference runner (DESIGN.md); every field is a job-config key."""

    # the method
    r: int = 16
    k: int = 16
    tau: float = 0.01
    delta: float = 0.2
    target_modules: list[str] = field(default_factory=lambda: list(XTAIL_TARGET_MODULES))
    # training, per domain
    iterations: int = 500
    batch_size: int = 64
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.9999)
    weight_decay: float = 0.0
    shots: int = 16
    seed: int = 0
    num_workers: int = 0
    # evaluation
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        _require("betas", self.betas, lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)")
        self.betas = tuple(self.betas)
        for name in ("iterations", "batch_size", "shots", "eval_batch_size"):
            _require(name, getattr(self, name), lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                     "an integer >= 1")
        for name in ("seed", "num_workers"):
            _require(name, getattr(self, name), lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                     "an integer >= 0")
        _require("lr", self.lr, lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0, "a number > 0")
        _require("weight_decay", self.weight_decay, lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0")
        self.moram_config()  # r, k, tau, delta, target_modules: validated by moram, naming the key

    def moram_config(self, **overrides: Any) -> MoRAMConfig:
        """The MoRAMConfig of these settings (other MoRAM knobs keep moram's defaults)."""
        values = {"r": self.r, "k": self.k, "tau": self.tau, "delta": self.delta,
                  "target_modules": list(self.target_modules), "seed": self.seed}
        return MoRAMConfig(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(name: str, value: Any, ok: Callable[[Any], bool], rule: str) -> None:
    try:
        valid = ok(value)
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"{name}: must be {rule}, got {value!r}")


def xtail_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor,
               num_seen: int, templates_per_class: int = 1) -> torch.Tensor:
    """The per-step loss. ``labels`` index the current domain's classes; ``tokens`` are their
    tokenized prompts ([classes * templates, context], class-major, see ``class_tokens``)."""
    image_features = F.normalize(model.encode_image(images), dim=-1)
    text_features = class_text_features(model, tokens, templates_per_class)
    return xtail_loss_from_features(image_features, text_features, model.logit_scale.exp(), labels, num_seen)


def xtail_loss_from_features(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
                             labels: torch.Tensor, num_seen: int) -> torch.Tensor:
    """``xtail_loss`` from unit image features [B, dim], unit class text features [classes, dim]
    (see ``class_text_features``) and the exponentiated logit scale: for an engine that has to
    run the model's own forward (DeepSpeed), which returns exactly these."""
    # image -> text over [seen | current]; the seen columns are masked, so they need no features.
    current = scale * image_features @ text_features.t()
    seen = current.new_full((current.shape[0], num_seen), float("-inf"))
    image_to_text = F.cross_entropy(torch.cat([seen, current], dim=1), labels + num_seen)

    # text -> image: each class in the batch picks out its images among the batch.
    classes, inverse = labels.unique(return_inverse=True)
    positives = F.one_hot(inverse, len(classes)).t().float()                  # [classes in batch, B]
    text_to_image = F.cross_entropy(scale * text_features[classes] @ image_features.t(),
                                    positives / positives.sum(dim=1, keepdim=True))
    return image_to_text + text_to_image


def train_domain(model: nn.Module, domain: Domain, seen_classnames: Sequence[str], settings: XTailSettings, *,
                 tokenizer: Callable, transform: Callable,
                 step_callback: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train ``model``'s trainable parameters (for MoRAM: the open task's atoms) on ``domain``'s
    few-shot split for ``settings.iterations`` steps.

    ``seen_classnames`` are the classes of the domains trained before, masked out of the
    image -> text softmax. ``step_callback(step, {"loss", "lr"})`` runs after every step.
    Returns {"losses", "images_per_s", "seconds", "iterations", "trainable_params"}.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise RuntimeError(f"train_domain({domain.name}): the model has no trainable parameters; "
                           f"call model.begin_task() first")
    device = parameters[0].device
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, betas=settings.betas,
                                  weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.iterations)
    tokens = class_tokens(tokenizer, domain).to(device)
    num_seen = len(seen_classnames)

    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step, (images, labels) in enumerate(_batches(domain, transform, settings), start=1):
        loss = xtail_loss(model, images.to(device), labels.to(device), tokens, num_seen, len(domain.templates))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step_callback is not None:
            step_callback(step, {"loss": losses[-1], "lr": schedule.get_last_lr()[0]})
    seconds = time.perf_counter() - start
    images_per_s = settings.iterations * settings.batch_size / seconds
    logger.info("domain %s: %d steps in %.1f s (%.1f images/s), loss %.4f -> %.4f", domain.name,
                settings.iterations, seconds, images_per_s, losses[0], losses[-1])
    return {"losses": losses, "images_per_s": images_per_s, "seconds": seconds,
            "iterations": settings.iterations, "trainable_params": sum(p.numel() for p in parameters)}


def _batches(domain: Domain, transform: Callable, settings: XTailSettings) -> DataLoader:
    """Exactly ``iterations`` batches of ``batch_size``, reshuffling the split every pass over it
    (seeded, so a rerun sees the same order)."""
    samples = ImageSamples(domain.train, transform)
    sampler = RandomSampler(samples, num_samples=settings.iterations * settings.batch_size,
                            generator=torch.Generator().manual_seed(settings.seed))
    return DataLoader(samples, batch_size=settings.batch_size, sampler=sampler,
                      num_workers=settings.num_workers)
