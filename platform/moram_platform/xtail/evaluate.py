"""X-TAIL evaluation: every domain's test set against the class prompts of *all* domains.

No domain id at test time: an image of domain j is correct only if the argmax over the union of
every domain's classes is its own class. The score is accuracy in percent (0-100).
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .data import Domain, ImageSamples

logger = logging.getLogger(__name__)


def class_tokens(tokenizer: Callable, domain: Domain) -> torch.Tensor:
    """The domain's prompts tokenized, class-major: [classes * templates, context]."""
    return tokenizer([prompt for class_prompts in domain.prompts() for prompt in class_prompts])


def class_text_features(model: nn.Module, tokens: torch.Tensor, templates_per_class: int) -> torch.Tensor:
    """[classes, dim] unit text features; a class with several templates gets their normalised mean."""
    return mean_over_templates(F.normalize(model.encode_text(tokens), dim=-1), templates_per_class)


def mean_over_templates(prompt_features: torch.Tensor, templates_per_class: int) -> torch.Tensor:
    """[classes * templates, dim] unit prompt features (class-major) -> [classes, dim] unit class features."""
    features = prompt_features.view(-1, templates_per_class, prompt_features.shape[-1]).mean(dim=1)
    return F.normalize(features, dim=-1)


@torch.no_grad()
def evaluate_domains(model: nn.Module, domains: Sequence[Domain], *, tokenizer: Callable,
                     transform: Callable, batch_size: int = 256, num_workers: int = 0) -> dict[str, float]:
    """{domain name: accuracy 0-100} over the union label space of ``domains`` (in eval mode,
    so MoRAM's inference threshold δ applies)."""
    was_training = model.training
    model.eval()
    try:
        text = union_text_features(model, domains, tokenizer)
        scores, offset = {}, 0
        for domain in domains:
            correct = count_correct(model, domain.test, text, offset, transform, batch_size, num_workers)
            scores[domain.name] = 100.0 * correct / len(domain.test)
            offset += domain.num_classes
        logger.info("X-TAIL accuracy over %d classes: %s", offset,
                    ", ".join(f"{name} {score:.2f}" for name, score in scores.items()))
        return scores
    finally:
        model.train(was_training)


@torch.no_grad()
def union_text_features(model: nn.Module, domains: Sequence[Domain], tokenizer: Callable) -> torch.Tensor:
    """[all classes of ``domains``, dim] unit text features, domain after domain (the label space)."""
    device = next(model.parameters()).device
    return torch.cat([class_text_features(model, class_tokens(tokenizer, domain).to(device), len(domain.templates))
                      for domain in domains])


@torch.no_grad()
def count_correct(model: nn.Module, samples: Sequence[tuple], text: torch.Tensor, offset: int, transform: Callable,
                  batch_size: int, num_workers: int = 0) -> int:
    """How many (image path, label) ``samples`` have their argmax over ``text`` at ``offset + label``."""
    device = text.device
    loader = DataLoader(ImageSamples(samples, transform), batch_size=batch_size, num_workers=num_workers)
    correct = 0
    for images, labels in loader:
        image_features = F.normalize(model.encode_image(images.to(device)), dim=-1)
        predicted = (image_features @ text.t()).argmax(dim=-1)
        correct += int((predicted == labels.to(device) + offset).sum())
    return correct
