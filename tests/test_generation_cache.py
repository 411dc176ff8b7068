"""Evaluation generation computes each prompt token once: the KV cache is used through the MoRAM
layers, and a batch's shared prompt start runs once and is shared. The real SmolLM2-135M with
MoRAM atoms that change its outputs (B != 0), real TRACE prompts."""
import pytest
import torch

from moram import MoRAMConfig, get_moram_model, load_causal_lm
from moram_platform.trace.data import load_split
from moram_platform.trace.evaluate import EvaluationProfile, _layout_free, _shared_prefix, generate_answers, get_profile
from moram_platform.trace.tokenize import GenerationCollator, TokenizationConfig

pytestmark = pytest.mark.slow
BUDGET = TokenizationConfig(256, 8, {})


@pytest.fixture(scope="module")
def memory_model(smollm2_dir, tmp_path_factory):
    base, tokenizer = load_causal_lm(smollm2_dir, dtype=torch.float32, cache_dir=tmp_path_factory.mktemp("cache"))
    model = get_moram_model(base, MoRAMConfig(r=4, k=4, tau=0.1, delta=0.0, dropout=0.0,
                                              target_modules=["q_proj", "v_proj"], seed=0))
    model.begin_task("random")
    with torch.no_grad():   # values that matter: the atoms shift the logits
        for layer in model.moram_layers.values():
            for parameter in layer.parameters():
                if parameter.requires_grad:
                    parameter.normal_(0, 0.02)
    model.end_task(prune=False)
    return model.eval(), tokenizer


def _prompts(trace_root):
    return [e.prompt for task in ("dbpedia", "agnews") for e in load_split(trace_root, task, "test", max_examples=8)]


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert _shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert _shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2          # the shorter keeps its last token
    assert _shared_prefix([[1, 2], [3, 2]]) == 0 and _shared_prefix([[1, 2, 3]]) == 0


def test_profiles_that_ban_repeated_ngrams_keep_plain_left_padding():
    assert not _layout_free(get_profile("moram-repo")) and not _layout_free(get_profile("lenient"))
    assert _layout_free(get_profile("olora")) and _layout_free(get_profile("trace"))


def test_the_kv_cache_is_used_through_the_moram_layers(memory_model, trace_root):
    """Generating n tokens for a prompt of L tokens runs L tokens through a wrapped layer once,
    then one token per step: L + n - 1 in all (without the cache: n L + n(n-1)/2)."""
    model, tokenizer = memory_model
    prompt = _prompts(trace_root)[:1]
    length = len(GenerationCollator(tokenizer, task="dbpedia", config=BUDGET).encode(prompt)[0])
    seen = []
    layer = next(iter(model.moram_layers.values()))
    handle = layer.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[1]))
    try:
        new = 5
        out = model.generate(**GenerationCollator(tokenizer, task="dbpedia", config=BUDGET)(prompt),
                             max_new_tokens=new, min_new_tokens=new, do_sample=False)
    finally:
        handle.remove()
    assert out.shape[1] == length + new
    assert seen == [length] + [1] * (new - 1)


REPETITION_PENALTY = EvaluationProfile("penalty", {"do_sample": False, "repetition_penalty": 1.2}, "olora", "")


@pytest.mark.parametrize("profile", ["olora", REPETITION_PENALTY])
def test_a_shared_prefix_gives_the_answers_of_plain_left_padding(memory_model, trace_root, profile):
    model, tokenizer = memory_model
    prompts = _prompts(trace_root)
    calls = []
    forward = model.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape if "input_ids" in kwargs else args[0].shape)
        return forward(*args, **kwargs)

    plain = generate_answers(model, tokenizer, prompts, profile, max_new_tokens=8, batch_size=4,
                             tokenization=BUDGET, progress=False, share_prefix=False)
    model.forward = counting
    try:
        shared = generate_answers(model, tokenizer, prompts, profile, max_new_tokens=8, batch_size=4,
                                  tokenization=BUDGET, progress=False, share_prefix=True)
    finally:
        del model.forward
    assert shared == plain
    assert any(shape[0] == 1 and shape[1] >= 16 for shape in calls), "no prefix was computed apart"
    assert len(set(plain)) > 1, "the answers should differ between prompts"
