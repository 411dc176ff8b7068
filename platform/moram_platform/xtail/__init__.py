"""X-TAIL building blocks (no Ray): open_clip backbones, image-folder domains with persisted
few-shot splits, the per-domain training loop, and evaluation over the union label space."""
from .backbone import TINY_VIT, TINY_VIT_CONFIG, XTAIL_TARGET_MODULES, Backbone, load_backbone, register_model_config
from .data import (DEFAULT_TEMPLATE, XTAIL_DOMAINS, XTAIL_TEMPLATES, Domain, DomainError, ImageSamples,
                   fetch_s3_folder, load_domain, validate_images)
from .evaluate import class_text_features, class_tokens, evaluate_domains
from .sequence import XTailResult, run_sequence
from .train import XTailSettings, train_domain, xtail_loss

__all__ = [
    "DEFAULT_TEMPLATE", "TINY_VIT", "TINY_VIT_CONFIG", "XTAIL_DOMAINS", "XTAIL_TARGET_MODULES", "XTAIL_TEMPLATES",
    "Backbone", "Domain", "DomainError", "ImageSamples", "XTailResult", "XTailSettings", "class_text_features",
    "class_tokens", "evaluate_domains", "fetch_s3_folder", "load_backbone", "load_domain", "register_model_config",
    "run_sequence", "train_domain", "validate_images", "xtail_loss",
]
