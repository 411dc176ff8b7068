"""evaluate_task plumbing: a tiny random Llama with the real SmolLM2 vocabulary (no pretrained
weights: these tests are about batching, padding, decoding and bookkeeping, not quality)."""
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from moram_platform.trace.data import load_split
from moram_platform.trace.evaluate import (
    MAX_NEW_TOKENS,
    PROFILES,
    EvaluationProfile,
    evaluate_task,
    generate_answers,
    get_profile,
)
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


@pytest.mark.parametrize("profile", list(PROFILES))
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


class EchoLastToken:
    """"Generates" each row's last prompt token again: an answer that tells which prompt it came from."""

    def __init__(self):
        self.calls = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append(attention_mask.sum(dim=1).tolist())
        return torch.cat([input_ids, input_ids[:, -1:]], dim=1)


def test_batches_are_cut_by_prompt_length_and_answers_keep_the_prompt_order(smollm2_tokenizer, trace_root):
    tok = smollm2_tokenizer
    prompts = [e.prompt for e in load_split(trace_root, "agnews", "test", max_examples=12)]   # 60-163 tokens
    echo = EchoLastToken()
    answers = generate_answers(echo, tok, prompts, "olora", batch_size=5, progress=False)
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(set(lengths)) > 6, "the test needs prompts of different lengths"
    # longest first, across and within the batches of 5, 5, 2
    assert [len(call) for call in echo.calls] == [5, 5, 2]
    seen = [n for call in echo.calls for n in call]
    assert seen == sorted(lengths, reverse=True)
    # answer i is prompt i's own last token
    assert answers == [tok.decode(tok(p, add_special_tokens=False)["input_ids"][-1:]) for p in prompts]


def test_profiles_are_the_official_protocols():
    assert list(PROFILES) == ["moram-repo", "trace", "lenient", "olora"]
    # MoRAM TRACE/inference/infer_part.py l. 303-315: greedy, repetition penalty 1.2, no
    # repeated 3-gram (temperature is passed but unused without sampling; one sequence).
    moram_repo = get_profile("moram-repo")
    assert moram_repo.generation == {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.2,
                                     "no_repeat_ngram_size": 3}
    assert moram_repo.scoring == "moram-repo"
    # TRACE inference/infer_multi.py l. 117-121, 186-191: sampling at temperature 0.1, HF's
    # top-k 50 / top-p 1.0 defaults.
    trace = get_profile("trace")
    assert trace.generation == {"do_sample": True, "temperature": 0.1, "top_k": 50, "top_p": 1.0}
    assert trace.scoring == "trace"
    assert get_profile("lenient").generation == moram_repo.generation and get_profile("lenient").scoring == "lenient"
    # Both runner scripts: --max_ans_len 512 (MoRAM runner_moram.sh l. 71, TRACE scripts/infer_seq.sh).
    assert MAX_NEW_TOKENS == 512
    # O-LoRA src/run_uie_lora.py:168-180, 554-568: greedy, one beam, repetition penalty 1.0.
    assert get_profile("olora").generation == {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0}
    assert get_profile("olora").scoring == "olora"
    with pytest.raises(ValueError, match="unknown evaluation profile 'reference'; choose one of moram-repo, trace, "
                                         "lenient, olora"):
        get_profile("reference")
    with pytest.raises(ValueError, match="scoring must be one of moram-repo, trace, lenient, olora, got 'fuzzy'"):
        EvaluationProfile("x", {}, "fuzzy", "")


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
    batched = generate_answers(tiny_llama, smollm2_tokenizer, prompts, "moram-repo", batch_size=5, **kwargs)
    single = generate_answers(tiny_llama, smollm2_tokenizer, prompts, "moram-repo", batch_size=1, **kwargs)
    assert batched == single


def test_bad_arguments(tiny_llama, smollm2_tokenizer, fomc):
    with pytest.raises(ValueError, match="no TRACE metric for 'Lima'"):
        evaluate_task(tiny_llama, smollm2_tokenizer, fomc, "Lima", "moram-repo", progress=False)
    with pytest.raises(ValueError, match="FOMC: no examples"):
        evaluate_task(tiny_llama, smollm2_tokenizer, [], "FOMC", "moram-repo", progress=False)
    with pytest.raises(ValueError, match="batch_size: must be a positive integer"):
        evaluate_task(tiny_llama, smollm2_tokenizer, fomc, "FOMC", "moram-repo", batch_size=0, progress=False)


class ForceTokens(LogitsProcessor):
    """Row i generates ``i`` copies of ``token`` and then EOS, whatever the model says."""

    def __init__(self, token: int, eos: int):
        self.token, self.eos, self.prompt_length = token, eos, None

    def __call__(self, input_ids, scores):
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        generated = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        for row in range(scores.shape[0]):
            forced[row, self.eos if generated >= row else self.token] = 0.0
        return forced


class KeepOutput:
    def __init__(self, model):
        self.model, self.outputs = model, []

    def generate(self, **kwargs):
        self.outputs.append(self.model.generate(**kwargs))
        return self.outputs[-1]


def test_generation_stops_at_eos_for_every_row(tiny_llama, smollm2_tokenizer, fomc):
    # Rows finish after 0, 1 and 2 tokens; HF pads finished rows and stops when all are done:
    # 3 new columns, not max_new_tokens (512), and the padding is not decoded.
    tok = smollm2_tokenizer
    a = tok("A", add_special_tokens=False)["input_ids"]
    assert len(a) == 1
    profile = EvaluationProfile("forced", {"do_sample": False, "logits_processor": LogitsProcessorList(
        [ForceTokens(a[0], tok.eos_token_id)])}, "moram-repo", "test")
    model = KeepOutput(tiny_llama)
    prompts = [e.prompt for e in fomc[:3]]
    answers = generate_answers(model, tok, prompts, profile, batch_size=3, tokenization=SHORT_PROMPTS,
                               progress=False)
    assert answers == ["", "A", "AA"]
    longest_prompt = max(min(len(tok(p, add_special_tokens=False)["input_ids"]), 96) for p in prompts)
    assert model.outputs[0].shape[1] == longest_prompt + 3
    pad, eos = tok.pad_token_id, tok.eos_token_id
    assert model.outputs[0][:, -3:].tolist() == [[eos, pad, pad], [a[0], eos, pad], [a[0], a[0], eos]]


def test_a_tokenizer_without_eos_is_refused(tiny_llama, smollm2_tokenizer):
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.eos_token = None
    with pytest.raises(ValueError, match="has no EOS token, so generation could not stop before max_new_tokens"):
        generate_answers(tiny_llama, tok, ["x"], "moram-repo", progress=False)


@pytest.mark.slow
def test_the_real_smollm2_stops_at_eos_well_before_the_default_512(smollm2_model_dir, trace_root):
    # The default budget is the official 512 new tokens; a batch ends once every row has produced
    # EOS. SmolLM2-135M-Instruct (untrained) ends FOMC answers within a few dozen tokens.
    from moram.loading import load_causal_lm

    model, tok = load_causal_lm(smollm2_model_dir, dtype=torch.float32)
    prompts = [e.prompt for e in load_split(trace_root, "FOMC", "test", max_examples=4)]
    spy, kept = SpyGenerator(model), KeepOutput(None)
    kept.model = spy
    answers = generate_answers(kept, tok, prompts, "moram-repo", task="FOMC", batch_size=4, progress=False)
    new_tokens = kept.outputs[0][:, spy.calls[0]["input_ids"].shape[1]:]
    assert spy.calls[0]["max_new_tokens"] == MAX_NEW_TOKENS == 512
    assert 1 <= new_tokens.shape[1] < 100                              # measured: 30 steps
    assert all((row == tok.eos_token_id).any() for row in new_tokens)   # every row ended with EOS
    assert len(answers) == 4 and all(tok.eos_token not in a for a in answers)
