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


def test_config_reaches_the_wrapped_model_and_the_method_config_is_moram_config():
    hf = tiny_llama()
    model = get_moram_model(hf, MoRAMConfig(r=2))
    assert model.config is hf.config                     # what HF generate and pipelines read
    assert model.moram_config == MoRAMConfig(r=2)


def test_open_task_state_restores_a_block_and_its_statistics():
    ids = torch.randint(0, 128, (2, 7))
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=2, method="moelora"))
    model.begin_task("t")
    model.train()
    with torch.no_grad():
        for layer in model.moram_layers.values():
            layer.B.normal_(), layer.router.normal_()
    model(input_ids=ids)
    state = model.open_task_state()
    name = next(iter(model.moram_layers))
    assert {k.rsplit(".", 1)[1] for k in state if k.startswith(name + ".")} == {"A", "B", "router", "activation_mass"}
    # one expert: each of the 14 tokens gives both of its atoms the expert's gate, 1
    torch.testing.assert_close(state[f"{name}.activation_mass"].sum(), torch.tensor(28.0))

    for with_stats, mass in ((True, 28.0), (False, 0.0)):
        other = get_moram_model(tiny_llama(), MoRAMConfig(r=2, method="moelora"))
        other.begin_task("t")
        other.load_open_task_state(state, with_stats=with_stats)
        for key, layer in other.moram_layers.items():
            assert torch.equal(layer.A, model.moram_layers[key].A) and torch.equal(layer.B, model.moram_layers[key].B)
            assert torch.equal(layer.router, model.moram_layers[key].router)
            assert layer.num_routed == layer.num_current   # a restored block has trained: it routes
        assert float(other.activation_stats()[name].sum()) == mass


def test_activation_stats_can_be_replaced_and_token_mask_excludes_padding():
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=2, k=2))
    model.begin_task("t")
    model.train()
    ids = torch.randint(0, 128, (2, 5))
    with model.token_mask(torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])):
        model(input_ids=ids)                               # no attention_mask: only token_mask hides padding
    stats = model.activation_stats()
    assert all(float(mass.sum()) == pytest.approx(7.0) for mass in stats.values())
    model.set_activation_stats({name: mass * 2 for name, mass in stats.items()})
    assert all(float(mass.sum()) == pytest.approx(14.0) for mass in model.activation_stats().values())
