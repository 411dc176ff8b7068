"""evaluate_task plumbing: a tiny random Llama with the real SmolLM2 vocabulary (no pretrained
weights: these tests are about batching, padding, decoding and bookkeeping, not quality)."""
import pytest
import torch

from moram_platform.trace.data import load_split
from moram_platform.trace.evaluate import PROFILES, evaluate_task, generate_answers, get_profile
from moram_platform.trace.tokenize import TokenizationConfig

SHORT_PROMPTS = TokenizationConfig(max_prompt_tokens=96)  # FOMC prompts: 56-117 tokens


@pytest.fixture(scope="module")
def tiny_llama(smollm2_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


class SpyGenerator:
    """A wrapper exposing only ``.generate``; records what it was called with."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def generate(self, **kwargs):
        self.calls.append(kwargs)
        return self.model.generate(**kwargs)


class ScriptedAnswer:
    """Always "generates" the same answer tokens after the prompt."""

    def __init__(self, answer_ids):
        self.answer_ids = answer_ids

    def generate(self, input_ids, attention_mask, **kwargs):
        tail = torch.tensor(self.answer_ids).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


@pytest.fixture(scope="module")
def fomc(trace_root):
    return load_split(trace_root, "FOMC", "test", max_examples=5)


@pytest.mark.parametrize("profile", ["reference", "trace"])
def test_evaluate_task_records_the_profile_and_pads_left(tiny_llama, smollm2_tokenizer, fomc, profile):
    spy = SpyGenerator(tiny_llama)
    result = evaluate_task(spy, smollm2_tokenizer, fomc, "FOMC", profile, max_new_tokens=3, batch_size=2,
                           tokenization=SHORT_PROMPTS, seed=0, progress=False)
    assert set(result) == {"task", "metric", "score", "profile", "n"}
    assert (result["task"], result["metric"], result["profile"], result["n"]) == ("FOMC", "accuracy", profile, 5)
    assert 0.0 <= result["score"] <= 100.0
    assert len(spy.calls) == 3  # 5 examples in batches of 2
    padded_rows = 0
    for call in spy.calls:
        for mask in call["attention_mask"].tolist():
            assert mask == [0] * mask.count(0) + [1] * mask.count(1), "generation must pad on the left"
            padded_rows += mask[0] == 0
        for key, value in PROFILES[profile].generation.items():
            assert call[key] == value
        assert call["max_new_tokens"] == 3 and call["pad_token_id"] == smollm2_tokenizer.pad_token_id
    assert padded_rows > 0, "the test needs prompts of different lengths"


def test_profiles_are_the_documented_protocols():
    reference, trace = get_profile("reference"), get_profile("trace")
    assert reference.generation == {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.2,
                                    "no_repeat_ngram_size": 3}
    assert reference.extraction == "lenient"
    assert trace.generation["do_sample"] is True and trace.generation["temperature"] == 0.1
    assert trace.extraction == "exact"
    with pytest.raises(ValueError, match="unknown evaluation profile 'greedy'; choose one of reference, trace"):
        get_profile("greedy")


def test_only_new_tokens_are_decoded_and_scored(smollm2_tokenizer, fomc):
    tok = smollm2_tokenizer
    model = ScriptedAnswer(tok("A", add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    answers = generate_answers(model, tok, [e.prompt for e in fomc], "trace", progress=False)
    assert answers == ["A"] * len(fomc)
    # Exact match of "A" against the references: the share of "A" answers among them.
    expected = 100.0 * sum(e.answer == "A" for e in fomc) / len(fomc)
    result = evaluate_task(model, tok, fomc, "FOMC", "trace", progress=False)
    assert result["score"] == pytest.approx(expected)


def test_left_padded_batches_generate_what_single_prompts_do(tiny_llama, smollm2_tokenizer, fomc):
    # Greedy decoding: padding a prompt on the left must not change what it generates.
    prompts = [e.prompt for e in fomc]
    kwargs = dict(max_new_tokens=4, tokenization=SHORT_PROMPTS, progress=False)
    batched = generate_answers(tiny_llama, smollm2_tokenizer, prompts, "reference", batch_size=5, **kwargs)
    single = generate_answers(tiny_llama, smollm2_tokenizer, prompts, "reference", batch_size=1, **kwargs)
    assert batched == single


def test_bad_arguments(tiny_llama, smollm2_tokenizer, fomc):
    with pytest.raises(ValueError, match="no TRACE metric for 'Lima'"):
        evaluate_task(tiny_llama, smollm2_tokenizer, fomc, "Lima", "reference", progress=False)
    with pytest.raises(ValueError, match="FOMC: no examples"):
        evaluate_task(tiny_llama, smollm2_tokenizer, [], "FOMC", "reference", progress=False)
    with pytest.raises(ValueError, match="batch_size: must be a positive integer"):
        evaluate_task(tiny_llama, smollm2_tokenizer, fomc, "FOMC", "reference", batch_size=0, progress=False)
