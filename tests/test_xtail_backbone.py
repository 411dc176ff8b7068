"""X-TAIL backbone: offline open_clip loading, explicit random init, MoRAM on both towers."""
import json
import warnings

import pytest
import torch

from fixtures.paths import PROJECT_ROOT

from moram import get_moram_model
from moram_platform.config import load_config
from moram_platform.xtail import TINY_VIT, TINY_VIT_CONFIG, XTAIL_TARGET_MODULES, load_backbone, register_model_config

# the MoRAM settings of the shipped X-TAIL job config (r = k = 16 on both towers' six targets)
XTAIL_MORAM = load_config(PROJECT_ROOT / "jobs" / "configs" / "xtail" / "vit-b-16_moram.yaml").moram_config


def _state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_random_init_without_the_flag_is_refused():
    with pytest.raises(ValueError, match=r"no pretrained weights given .*allow_random_init=True"):
        load_backbone(TINY_VIT)


def test_random_init_with_the_flag_warns_logs_and_is_reproducible(caplog):
    with pytest.warns(UserWarning, match="randomly initialised"):
        first = load_backbone(TINY_VIT, allow_random_init=True, init_seed=3)
    assert any("randomly initialised" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert first.pretrained is None
    with pytest.warns(UserWarning):
        again = load_backbone(TINY_VIT, allow_random_init=True, init_seed=3)
        other = load_backbone(TINY_VIT, allow_random_init=True, init_seed=4)
    assert _same(_state(first.model), _state(again.model))
    assert not _same(_state(first.model), _state(other.model))


def test_local_checkpoint_is_loaded_without_a_warning(tmp_path):
    with pytest.warns(UserWarning):
        source = load_backbone(TINY_VIT, allow_random_init=True, init_seed=7)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(source.model.state_dict(), checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint load must not warn about random init
        loaded = load_backbone(TINY_VIT, pretrained=checkpoint, init_seed=0)
    assert loaded.pretrained == str(checkpoint)
    assert _same(_state(source.model), _state(loaded.model))


def test_local_dir_model_needs_its_weights_or_the_flag(tmp_path):
    with pytest.warns(UserWarning):
        source = load_backbone(TINY_VIT, allow_random_init=True, init_seed=9)
    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_VIT_CONFIG}))
    with pytest.raises(ValueError, match="no pretrained weights given"):
        load_backbone(f"local-dir:{folder}")

    torch.save(source.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_backbone(f"local-dir:{folder}")
    assert loaded.pretrained == str(folder)
    assert _same(_state(source.model), _state(loaded.model))
    with pytest.raises(ValueError, match="takes its weights from the folder"):
        load_backbone(f"local-dir:{folder}", pretrained="openai")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(f"local-dir:{tmp_path / 'nowhere'}", allow_random_init=True)


def test_a_tag_that_needs_a_download_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pretrained='openai' of 'ViT-B-16' would have to be downloaded"
                                                 r".*never downloads weights"):
        load_backbone("ViT-B-16", pretrained="openai", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"neither a local checkpoint file nor a pretrained tag of "
                                                 r"'ViT-B-16' \(its tags: \[.*'openai'"):
        load_backbone("ViT-B-16", pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="'hf-hub:' models are downloaded"):
        load_backbone("hf-hub:timm/vit_base_patch16_clip_224.openai", allow_random_init=True)


def test_registered_config_builds_that_architecture():
    config = {"embed_dim": 32,
              "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3}}
    name = register_model_config("xtail-test-micro", config)
    with pytest.warns(UserWarning):
        backbone = load_backbone(name, allow_random_init=True)
    assert len(backbone.model.visual.transformer.resblocks) == 1
    assert len(backbone.model.transformer.resblocks) == 3
    assert backbone.tokenizer(["a photo of a cat."]).shape == (1, 8)
    with pytest.raises(ValueError, match="missing key 'text_cfg'"):
        register_model_config("broken", {"embed_dim": 8, "vision_cfg": {}})


def test_moram_wraps_every_target_of_both_towers_and_starts_as_the_base():
    with pytest.warns(UserWarning):
        backbone = load_backbone(TINY_VIT, allow_random_init=True)
    images = torch.randn(3, 3, 32, 32)
    tokens = backbone.tokenizer(["a photo of a cat.", "a photo of the number: \"3\"."])
    backbone.model.eval()
    with torch.no_grad():
        base_image, base_text = backbone.model.encode_image(images), backbone.model.encode_text(tokens)

    model = get_moram_model(backbone.model, XTAIL_MORAM.replace())
    # 2 towers x 2 blocks x (q, k, v, out, c_fc, c_proj)
    assert len(model.moram_layers) == 24
    for tower in ("visual.transformer.resblocks", "transformer.resblocks"):
        for block in range(2):
            for target in XTAIL_TARGET_MODULES:
                part = "attn" if target.endswith("_proj") and target != "c_proj" else "mlp"
                assert f"{tower}.{block}.{part}.{target}" in model.moram_layers
    model.begin_task("first")
    model.eval()
    with torch.no_grad():  # fresh atoms have B = 0 and never-trained atoms do not route
        torch.testing.assert_close(model.encode_image(images), base_image, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), base_text, rtol=0, atol=1e-5)


def test_only_the_new_atoms_train():
    with pytest.warns(UserWarning):
        backbone = load_backbone(TINY_VIT, allow_random_init=True)
    model = get_moram_model(backbone.model, XTAIL_MORAM.replace())
    model.begin_task("first")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[-1] for n in trainable} == {"A", "B"}, sorted(trainable)[:4]
    assert sum(p.numel() for p in trainable.values()) == 16 * sum(
        layer.in_features + layer.out_features for layer in model.moram_layers.values())


def test_a_cached_tag_resolves_to_its_file_with_the_tag_settings(tmp_path):
    """The Hugging Face cache layout, as a download would have left it (no network involved)."""
    from moram_platform.xtail.backbone import _resolve_pretrained

    repo = tmp_path / "models--timm--vit_base_patch16_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    weights = repo / "snapshots" / "0123abcd" / "open_clip_pytorch_model.bin"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    checkpoint, kwargs = _resolve_pretrained("ViT-B-16", "openai", cache_dir=tmp_path)
    assert checkpoint == str(weights)
    assert kwargs["force_quick_gelu"] is True  # OpenAI's CLIP was trained with QuickGELU
    assert kwargs["force_preprocess_cfg"]["mean"] == (0.48145466, 0.4578275, 0.40821073)
