"""The ``xtail:`` section of a job config (benchmark: xtail), declared by the benchmark.

A pydantic dataclass rather than a BaseModel: its YAML key ``model_config`` is the name pydantic
reserves on BaseModel for the model's own settings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic.dataclasses import dataclass

from ..sections import SECTION_CONFIG, AtLeastOne, AtLeastZero, Bool, NonEmptyStr, Str, absolute


@dataclass(config=SECTION_CONFIG)
class XTailSection:
    """CLIP / X-TAIL specifics; model.source is the open_clip model name."""

    pretrained: NonEmptyStr | None = Field(None, description="an open_clip pretrained tag (already cached) or a "
                                                     "checkpoint file; null: the model folder's weights or none")
    allow_random_init: Bool = Field(False, description="no pretrained weights: allowed only with this flag "
                                                       "(tests and benchmarks), with a warning")
    model_config: dict[Str, Any] | None = Field(None, description="a custom open_clip model config (embed_dim, "
                                                                   "vision_cfg, text_cfg) registered as model.source")
    shots: AtLeastOne = Field(16, description="training images per class in the few-shot split")
    split_seed: AtLeastZero = Field(0, description="seed of the few-shot split draw")
    split_dir: NonEmptyStr | None = Field(None, description="where few-shot split files are saved (default: next to "
                                                    "the data)")
    domain_sources: dict[Str, NonEmptyStr] = Field(default_factory=dict, description="domain -> folder or s3:// URI "
                                                                            "(default <data.root>/<domain>)")
    templates: dict[Str, list[Str]] = Field(default_factory=dict, description="domain -> prompt templates "
                                                                              "(default: the X-TAIL templates)")
    cache_dir: NonEmptyStr | None = Field(None, description="local mirror of s3:// domains")

    def resolve_paths(self) -> None:
        """Local paths made absolute in place, so that Ray workers read the same files."""
        for key in ("split_dir", "cache_dir"):
            if getattr(self, key):
                setattr(self, key, absolute(getattr(self, key)))
        if self.pretrained and Path(self.pretrained).expanduser().exists():  # a file, not a tag
            self.pretrained = absolute(self.pretrained)
        self.domain_sources = {name: absolute(source) for name, source in self.domain_sources.items()}
