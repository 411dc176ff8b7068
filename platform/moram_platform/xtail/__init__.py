"""X-TAIL building blocks (no Ray): open_clip backbones, image-folder domains with persisted
few-shot splits, the training loss, and evaluation over the union label space. Training runs
through the platform (``moram_platform.training.train_task`` with ``XTailBenchmark``)."""
from .backbone import TINY_VIT, TINY_VIT_CONFIG, XTAIL_TARGET_MODULES, Backbone, load_backbone, register_model_config
from .data import (DEFAULT_TEMPLATE, XTAIL_CLASSNAMES, XTAIL_DOMAINS, XTAIL_TEMPLATES, Domain, DomainError,
                   ImageSamples, fetch_s3_folder, load_domain, validate_images)
from .evaluate import class_text_features, class_tokens, evaluate_domains
from .loss import text_token_mask, xtail_loss

__all__ = [
    "DEFAULT_TEMPLATE", "TINY_VIT", "TINY_VIT_CONFIG", "XTAIL_CLASSNAMES", "XTAIL_DOMAINS", "XTAIL_TARGET_MODULES", "XTAIL_TEMPLATES",
    "Backbone", "Domain", "DomainError", "ImageSamples", "class_text_features", "class_tokens", "evaluate_domains",
    "fetch_s3_folder", "load_backbone", "load_domain", "register_model_config", "text_token_mask",
    "validate_images", "xtail_loss",
]
