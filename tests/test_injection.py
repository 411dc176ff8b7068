"""Injection leaves every supported model's outputs unchanged before atoms train."""
import pytest
import torch
from torch import nn

from moram import MoRAMConfig, MoRAMConfigError, get_moram_model
from moram.attention import SplitMultiheadAttention
from fixtures.models import tiny_gemma3, tiny_gpt2, tiny_llama

CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"]


def tiny_clip():
    import open_clip

    torch.manual_seed(0)
    vision = open_clip.CLIPVisionCfg(layers=2, width=64, head_width=32, image_size=32, patch_size=8)
    text = open_clip.CLIPTextCfg(context_length=16, vocab_size=1000, width=64, heads=2, layers=2)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


@pytest.mark.parametrize("build, targets", [
    (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (tiny_gemma3, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    (tiny_gpt2, ["c_attn", "c_proj"]),
])
def test_causal_lm_outputs_unchanged_by_injection(build, targets):
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        reference = build()(ids).logits
        model = get_moram_model(build(), MoRAMConfig(r=4, target_modules=targets))
        model.begin_task("t")                # fresh atoms: B = 0
        model.train()                        # even when they route (training mode)
        torch.testing.assert_close(model.model.eval()(ids).logits, reference, rtol=0, atol=0)
    trainable, total = model.parameter_counts()
    assert trainable == sum(l.A.numel() + l.B.numel() for l in model.moram_layers.values())
    assert total > trainable


def test_open_clip_split_attention_matches_fused_and_carries_atoms():
    reference = tiny_clip()
    images, text = torch.randn(3, 3, 32, 32), torch.randint(0, 1000, (4, 16))
    with torch.no_grad():
        ref_image, ref_text = reference.encode_image(images), reference.encode_text(text)
    model = get_moram_model(tiny_clip(), MoRAMConfig(r=4, target_modules=CLIP_TARGETS))
    splits = [m for m in model.modules() if isinstance(m, SplitMultiheadAttention)]
    assert len(splits) == 4  # 2 vision + 2 text blocks
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    # q, k, v, out + c_fc, c_proj in each of the 4 blocks
    assert len(model.moram_layers) == 4 * 6
    model.begin_task("domain-1")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ref_image, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(text), ref_text, rtol=1e-5, atol=1e-5)
    # open_clip reads dtypes through the wrapped layers
    assert model.model.transformer.get_cast_dtype() == torch.float32


def test_split_attention_honours_masks_like_torch():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    split = SplitMultiheadAttention(mha).eval()
    q = torch.randn(2, 5, 16)
    causal = torch.full((5, 5), float("-inf")).triu(1)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        for kwargs in ({}, {"attn_mask": causal}, {"key_padding_mask": padding},
                       {"attn_mask": causal.isinf(), "key_padding_mask": padding}):
            expected, _ = mha(q, q, q, need_weights=False, **kwargs)
            got, _ = split(q, q, q, need_weights=False, **kwargs)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        expected, weights = mha(q, q, q, need_weights=True, attn_mask=causal)
        got, got_weights = split(q, q, q, need_weights=True, attn_mask=causal)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_weights, weights, rtol=1e-5, atol=1e-5)


def test_only_targets_are_wrapped_and_base_is_frozen():
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert sorted({n.rsplit(".", 1)[1] for n in model.moram_layers}) == ["q_proj", "v_proj"]
    assert len(model.moram_layers) == 4
    assert not any(p.requires_grad for p in model.parameters())


def test_regex_targets_match_full_names():
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=2, target_modules=r".*layers\.0\.self_attn\.(q|k)_proj"))
    assert sorted(model.moram_layers) == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"]


def test_targets_that_match_nothing_list_the_existing_names():
    with pytest.raises(MoRAMConfigError) as error:
        get_moram_model(tiny_llama(), MoRAMConfig(target_modules=["query", "value"]))
    message = str(error.value)
    assert "target_modules" in message and "'q_proj'" in message and "'down_proj'" in message


def test_split_attention_projections_are_frozen_base_weights():
    model = get_moram_model(tiny_clip(), MoRAMConfig(r=2, target_modules=["out_proj"]))
    assert not any(p.requires_grad for p in model.parameters())
    model.begin_task("t")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("out_proj.A") or n.endswith("out_proj.B") for n in trainable)
