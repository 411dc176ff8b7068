"""The X-TAIL training loss, reduced as the official code (XTAIL/models/moram.py, ``train_model``) does.

Two terms over unit image features [B, dim] and unit class text features [C, dim] of the current
domain, both scaled by CLIP's exp(logit_scale):

* image -> text: cross-entropy of each image over [seen | current] classes with the seen
  (earlier domains') columns at -inf, i.e. a softmax over the current domain's classes;
  mean over the B images.
* text -> image: every class row of [seen | current] (N_all = num_seen + C rows) against the
  batch's B images, with a 0/1 target on the images of that class (not normalised: a class
  with m images in the batch adds the m log-probabilities); the sum over rows divided by
  N_all (``F.cross_entropy``'s mean over rows). Seen rows and current classes absent from the
  batch have no positive image: they add 0 but count in N_all.

``text_token_mask`` marks the real tokens of open_clip prompts, so that padding never counts in
MoRAM's activation statistics (pruning mass).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def xtail_loss(image_features: torch.Tensor, class_features: torch.Tensor, scale: torch.Tensor,
               labels: torch.Tensor, num_seen: int) -> torch.Tensor:
    """The per-step loss. ``labels`` index the current domain's C classes (rows of
    ``class_features``); ``num_seen`` is the number of classes of the domains trained before."""
    logits = scale * image_features @ class_features.t()                      # [B, C]
    # the seen columns are -inf: their softmax weight is 0, so they need no text features
    image_to_text = F.cross_entropy(logits, labels)
    positives = F.one_hot(labels, class_features.shape[0]).t().to(logits.dtype)   # [C, B]
    text_to_image = F.cross_entropy(logits.t(), positives, reduction="sum") / (num_seen + class_features.shape[0])
    return image_to_text + text_to_image


def text_token_mask(tokens: torch.Tensor) -> torch.Tensor:
    """[prompts, context] 1 up to and including each prompt's end-of-text token, 0 on the padding
    after it. open_clip pads with id 0, which is also a real token ("!"); the end-of-text token
    has the highest id of the vocabulary, which is how open_clip itself finds it (argmax)."""
    end = tokens.argmax(dim=-1, keepdim=True)
    positions = torch.arange(tokens.shape[-1], device=tokens.device)
    return (positions <= end).long()
