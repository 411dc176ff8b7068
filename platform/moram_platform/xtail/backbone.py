"""The X-TAIL backbone: an open_clip model with its tokenizer and image transforms, loaded offline.

    backbone = load_backbone("ViT-B-16", pretrained="/models/vit-b-16.pt")   # a local checkpoint
    backbone = load_backbone("ViT-B-16", pretrained="openai")                # a tag, if already cached
    backbone = load_backbone("xtail-tiny-vit", allow_random_init=True)       # tests, benchmarks
    model = get_moram_model(backbone.model, load_config("jobs/configs/xtail/vit-b-16_moram.yaml").moram_config)

Nothing here downloads: a pretrained tag resolves only to a file already in the local open_clip /
Hugging Face cache, and random initialisation has to be asked for explicitly.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from torch import nn

logger = logging.getLogger(__name__)

# The X-TAIL targets: attention q, k, v, out (nn.MultiheadAttention split by moram) and the MLP.
XTAIL_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")

# A CLIP small enough to train on CPU in tests: ViT 2x64 on 32 px images, text 2x64, 16 tokens.
TINY_VIT_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_VIT = "xtail-tiny-vit"

_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")


@dataclass
class Backbone:
    """What a run needs from open_clip: the model, its tokenizer and its two image transforms."""

    name: str
    pretrained: str | None          # the checkpoint file (or local-dir folder) loaded; None = random init
    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    train_transform: Callable
    eval_transform: Callable


def register_model_config(name: str, config: dict[str, Any]) -> str:
    """Make an architecture dict loadable by name, through open_clip's public ``add_model_config``.

    open_clip reads configs from JSON files; the dict is written to a per-process folder.
    Registering the same name again replaces the earlier config.
    """
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        raise ValueError(f"model config {name!r}: missing key {missing[0]!r} (open_clip needs "
                         f"embed_dim, vision_cfg and text_cfg)")
    path = _config_folder() / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return name


_CONFIG_FOLDER: Path | None = None


def _config_folder() -> Path:
    global _CONFIG_FOLDER
    if _CONFIG_FOLDER is None:
        _CONFIG_FOLDER = Path(tempfile.mkdtemp(prefix="open_clip_configs-"))
    return _CONFIG_FOLDER


def load_backbone(name: str, pretrained: str | os.PathLike | None = None, *,
                  allow_random_init: bool = False, init_seed: int = 0,
                  cache_dir: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu") -> Backbone:
    """An open_clip model by architecture name and a pretrained tag or local checkpoint path.

    ``pretrained=None`` means random weights, which only ``allow_random_init=True`` permits
    (warned and logged); ``init_seed`` then makes every process build the same weights.
    ``cache_dir`` is where cached tag weights are looked up (default: open_clip's and the
    Hugging Face cache). ``TINY_VIT`` is registered on import of this module.
    """
    if name.startswith("hf-hub:"):
        raise ValueError(f"model {name!r}: 'hf-hub:' models are downloaded by open_clip and this "
                         f"platform never downloads; save the model locally and use 'local-dir:<path>'")
    checkpoint, kwargs = None, {}
    if name.startswith("local-dir:"):
        # open_clip reads config and weights from the folder, and quietly random-inits without weights
        folder = Path(name.removeprefix("local-dir:"))
        if pretrained is not None:
            raise ValueError(f"model {name!r}: a 'local-dir:' model takes its weights from the folder; "
                             f"pretrained={str(pretrained)!r} would be ignored")
        if not folder.is_dir():
            raise FileNotFoundError(f"model {name!r}: folder {folder} does not exist")
        if any(p.suffix in (".safetensors", ".bin", ".pth") for p in folder.iterdir()):
            loaded_from = str(folder)
        else:
            _require_random_init_flag(name, allow_random_init)
            loaded_from = None
    elif pretrained is None:
        _require_random_init_flag(name, allow_random_init)
        loaded_from = None
    else:
        checkpoint, kwargs = _resolve_pretrained(name, str(pretrained), cache_dir)
        loaded_from = checkpoint
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)  # random init is reproducible; the caller's RNG is untouched
        model, train_transform, eval_transform = open_clip.create_model_and_transforms(
            name, pretrained=checkpoint, device=device, **kwargs)
    logger.info("backbone %s loaded from %s", name, loaded_from or "random init")
    return Backbone(name=name, pretrained=loaded_from, model=model, tokenizer=open_clip.get_tokenizer(name),
                    train_transform=train_transform, eval_transform=eval_transform)


def empty_backbone_model(name: str) -> nn.Module:
    """The model ``load_backbone(name, ...)`` builds, on the meta device: open_clip's own
    construction of the architecture, no weight read or allocated (checks of its structure)."""
    quiet = logging.root.manager.disable     # open_clip warns of a random init: no weights is the point
    logging.disable(logging.WARNING)
    try:
        with torch.device("meta"):
            return open_clip.create_model(name, pretrained=None, load_weights=False, device="meta")
    finally:
        logging.disable(quiet)


def _require_random_init_flag(name: str, allow_random_init: bool) -> None:
    if not allow_random_init:
        raise ValueError(
            f"model {name!r}: no pretrained weights given (pretrained=None). Pass a pretrained tag or a "
            f"local checkpoint path, or allow_random_init=True to train a randomly initialised model "
            f"(tests and benchmarks only: its accuracies say nothing about CLIP)")
    message = (f"model {name!r} is randomly initialised (allow_random_init=True): "
               f"no pretrained weights are loaded")
    warnings.warn(message, UserWarning, stacklevel=3)
    logger.warning(message)


def _resolve_pretrained(name: str, pretrained: str, cache_dir) -> tuple[str, dict[str, Any]]:
    """(local checkpoint file, create_model kwargs) for a checkpoint path or a cached tag."""
    tag = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag:
        if Path(pretrained).expanduser().is_file():
            return str(Path(pretrained).expanduser()), {}
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise FileNotFoundError(f"pretrained={pretrained!r}: neither a local checkpoint file nor a "
                                f"pretrained tag of {name!r} (its tags: {tags})")
    checkpoint = _cached_tag_file(tag, cache_dir)
    if checkpoint is None:
        raise FileNotFoundError(
            f"pretrained={pretrained!r} of {name!r} would have to be downloaded "
            f"({tag.get('hf_hub') or tag.get('url')}), and this platform never downloads weights. "
            f"Download it where there is internet access and pass the file as pretrained=<path>, or "
            f"put it in the cache (cache_dir={cache_dir!r})")
    # What open_clip would take from the tag had it downloaded it: preprocessing and QuickGELU.
    kwargs: dict[str, Any] = {"force_preprocess_cfg": {k: tag[k] for k in _PREPROCESS_KEYS if k in tag}}
    if tag.get("quick_gelu"):
        kwargs["force_quick_gelu"] = True
    return checkpoint, kwargs


def _cached_tag_file(tag: dict[str, Any], cache_dir) -> str | None:
    """The tag's weights file if it is already on disk; never touches the network."""
    if "file" in tag:
        return tag["file"] if Path(tag["file"]).is_file() else None
    if tag.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(tag["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        stem, _ = os.path.splitext(filename)
        for candidate in (stem + ".safetensors", filename):
            found = try_to_load_from_cache(repo, candidate, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
    if tag.get("url"):
        path = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(tag["url"])
        if path.is_file():
            return str(path)
    return None


register_model_config(TINY_VIT, TINY_VIT_CONFIG)
