"""TRACE tokenisation with the real SmolLM2 tokenizer (and a toy one that adds BOS, has no pad)."""
import pytest
import torch

from moram_platform.trace.data import TraceExample, load_split
from moram_platform.trace.tokenize import (
    IGNORE_INDEX,
    GenerationCollator,
    TokenizationConfig,
    TokenizedExample,
    TrainingCollator,
    pack_for_training,
    pad_for_generation,
    pad_for_training,
    pad_token_id,
    tokenize_example,
    tokenizer_adds_bos,
)


@pytest.fixture(scope="module")
def fomc_examples(trace_root):
    return load_split(trace_root, "FOMC", "test", max_examples=4)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def unpadded(row_ids, row_mask):
    return [t for t, m in zip(row_ids.tolist(), row_mask.tolist()) if m]


def test_example_is_prompt_then_answer_then_eos(smollm2_tokenizer, fomc_examples):
    tok = smollm2_tokenizer
    example = fomc_examples[0]
    tokenized = tokenize_example(tok, example)
    assert not tokenizer_adds_bos(tok)  # SmolLM2 adds no BOS of its own; no chat template either
    assert tokenized.prompt_ids == ids(tok, example.prompt)
    assert tokenized.answer_ids == ids(tok, example.answer) + [tok.eos_token_id]
    assert tokenized.input_ids == tokenized.prompt_ids + tokenized.answer_ids
    assert tokenized.labels == [IGNORE_INDEX] * len(tokenized.prompt_ids) + tokenized.answer_ids


def test_training_batch_masks_exactly_the_prompt_and_padding(smollm2_tokenizer, fomc_examples):
    tok = smollm2_tokenizer
    batch = TrainingCollator(tok, task="FOMC")(fomc_examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    lengths = {len(tokenize_example(tok, e).input_ids) for e in fomc_examples}
    assert len(lengths) > 1, "the test needs examples of different lengths"
    for row, example in enumerate(fomc_examples):
        prompt, answer = ids(tok, example.prompt), ids(tok, example.answer) + [tok.eos_token_id]
        real = len(prompt) + len(answer)
        pad = batch["input_ids"].shape[1] - real
        # right padding: real tokens first, then pad
        assert batch["input_ids"][row].tolist() == prompt + answer + [pad_token_id(tok)] * pad
        assert batch["attention_mask"][row].tolist() == [1] * real + [0] * pad
        assert batch["labels"][row].tolist() == [IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * pad


def test_right_and_left_padding_hold_the_same_sequences(smollm2_tokenizer, fomc_examples):
    tok = smollm2_tokenizer
    train = TrainingCollator(tok, task="FOMC")(fomc_examples)
    generate = GenerationCollator(tok, task="FOMC")(fomc_examples)
    for row, example in enumerate(fomc_examples):
        tokenized = tokenize_example(tok, example)
        assert unpadded(train["input_ids"][row], train["attention_mask"][row]) == tokenized.input_ids
        assert unpadded(generate["input_ids"][row], generate["attention_mask"][row]) == tokenized.prompt_ids
        # left padding: every prompt ends at the last column
        mask = generate["attention_mask"][row].tolist()
        assert mask == [0] * mask.count(0) + [1] * mask.count(1)
    # The same token lists padded either way come back identical.
    sequences = [tokenize_example(tok, e).input_ids for e in fomc_examples]
    left = pad_for_generation(sequences, pad_id=0)
    right = pad_for_training([tokenize_example(tok, e) for e in fomc_examples], pad_id=0)
    for row in range(len(sequences)):
        assert unpadded(left["input_ids"][row], left["attention_mask"][row]) == sequences[row]
        assert unpadded(right["input_ids"][row], right["attention_mask"][row]) == sequences[row]


def test_prompt_is_cut_from_the_left_and_answer_from_the_right(smollm2_tokenizer, trace_root):
    tok = smollm2_tokenizer
    example = load_split(trace_root, "MeetingBank", "test", max_examples=1)[0]
    config = TokenizationConfig(max_prompt_tokens=32, max_answer_tokens=8, long_prompt_tasks={})
    tokenized = tokenize_example(tok, example, config)
    full_prompt, full_answer = ids(tok, example.prompt), ids(tok, example.answer)
    assert len(full_prompt) > 32 and len(full_answer) > 8
    assert tokenized.prompt_ids == full_prompt[-32:]  # the end ("...\nSummary:") is kept
    assert tok.decode(tokenized.prompt_ids).endswith("Summary:")
    assert tokenized.answer_ids == full_answer[:8]  # truncated answer: no EOS, it did not end there


def test_meetingbank_prompt_keeps_its_start(smollm2_tokenizer, trace_root):
    # MoRAM TRACE/utils/data/data_collator.py l. 60-76, 215-223: for MeetingBank the tokenizer's
    # truncation_side is "right": the instruction and the transcript's start are kept.
    tok = smollm2_tokenizer
    example = load_split(trace_root, "MeetingBank", "test", max_examples=1)[0]
    config = TokenizationConfig(max_prompt_tokens=16, long_prompt_tasks={"MeetingBank": 32}, max_answer_tokens=8)
    full_prompt = ids(tok, example.prompt)
    tokenized = tokenize_example(tok, example, config, task="MeetingBank")
    assert tokenized.prompt_ids == full_prompt[:32]
    assert tok.decode(tokenized.prompt_ids).startswith("Write a summary of the following meeting transcripts.")
    generation = GenerationCollator(tok, task="MeetingBank", config=config)([example])
    assert generation["input_ids"][0].tolist() == full_prompt[:32]
    # Other tasks keep the end; the set of tasks is configurable.
    assert tokenize_example(tok, example, config, task="FOMC").prompt_ids == full_prompt[-16:]
    assert config.keeps_prompt_start("MeetingBank") and not config.keeps_prompt_start("FOMC")
    left = TokenizationConfig(long_prompt_tasks={"MeetingBank": 32}, keep_start_tasks=frozenset())
    assert tokenize_example(tok, example, left, task="MeetingBank").prompt_ids == full_prompt[-32:]


def test_meetingbank_gets_the_longer_prompt_limit(smollm2_tokenizer, trace_root):
    config = TokenizationConfig()
    limits = (config.prompt_limit("MeetingBank"), config.prompt_limit("FOMC"), config.max_answer_tokens)
    assert limits == (4096, 1024, 512)
    long_example = max(load_split(trace_root, "MeetingBank", "test"), key=lambda e: len(e.prompt))
    n_prompt = len(ids(smollm2_tokenizer, long_example.prompt))
    assert n_prompt > 1024, "the test needs a MeetingBank prompt over 1024 tokens"
    assert len(tokenize_example(smollm2_tokenizer, long_example, task="MeetingBank").prompt_ids) == min(n_prompt, 4096)
    assert len(tokenize_example(smollm2_tokenizer, long_example, task="FOMC").prompt_ids) == 1024


def test_pad_to_multiple_of(smollm2_tokenizer, fomc_examples):
    batch = TrainingCollator(smollm2_tokenizer, pad_to_multiple_of=64)(fomc_examples)
    assert batch["input_ids"].shape[1] % 64 == 0
    prompts = GenerationCollator(smollm2_tokenizer, pad_to_multiple_of=64)(["Hello", "Hello world"])
    assert prompts["input_ids"].shape == (2, 64)


# -- another tokenizer: adds BOS by default, has no pad token ----------------------------------------
@pytest.fixture(scope="module")
def bos_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate("q a b c d e".split())}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


def test_tokenizer_that_adds_bos_and_has_no_pad(bos_tokenizer):
    # ids: <s>=0 </s>=1 q=3 a=4 b=5 c=6 d=7 e=8
    assert bos_tokenizer.pad_token is None and tokenizer_adds_bos(bos_tokenizer)
    assert pad_token_id(bos_tokenizer) == 1  # falls back to EOS
    config = TokenizationConfig(max_prompt_tokens=3)
    # prompt "q a b c" cut to 3 tokens keeping BOS first: <s> b c; answer "d e" + </s>
    tokenized = tokenize_example(bos_tokenizer, TraceExample("q a b c", "d e"), config)
    assert (tokenized.prompt_ids, tokenized.answer_ids) == ([0, 5, 6], [7, 8, 1])
    batch = TrainingCollator(bos_tokenizer, config=config)([{"prompt": "q a b c", "answer": "d e"},
                                                           {"prompt": "q", "answer": "e"}])
    assert batch["input_ids"].tolist() == [[0, 5, 6, 7, 8, 1], [0, 3, 8, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 8, 1], [-100, -100, 8, 1, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    prompts = GenerationCollator(bos_tokenizer, config=config)(["q a b c", "q"])
    assert prompts["input_ids"].tolist() == [[0, 5, 6], [1, 0, 3]]
    assert prompts["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    # add_bos=False overrides the tokenizer's habit
    no_bos = TokenizationConfig(max_prompt_tokens=3, add_bos=False)
    assert tokenize_example(bos_tokenizer, TraceExample("q a b c", "d"), no_bos).prompt_ids == [4, 5, 6]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_prompt_tokens": 0}, "max_prompt_tokens: must be a positive integer, got 0"),
        ({"max_answer_tokens": 1.5}, "max_answer_tokens: must be a positive integer"),
        ({"long_prompt_tasks": {"MeetingBank": -1}}, "long_prompt_tasks.MeetingBank: must be a positive integer"),
        ({"keep_start_tasks": "MeetingBank"}, "keep_start_tasks: must be a collection of task names"),
    ],
)
def test_bad_limits_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenizationConfig(**kwargs)


def test_packing_fills_rows_first_fit_longest_first_and_restarts_positions():
    """Lengths 5, 3, 2, 4 (prompt + answer): rows of 5 (the longest) hold [5], [4 + 1 filler],
    [3 + 2]; labels are -100 on prompts and filler; the filler is its own sequence."""
    a = TokenizedExample([1, 2, 3], [4, 5])         # 5 tokens
    b = TokenizedExample([6, 7], [8])               # 3
    c = TokenizedExample([9], [10])                 # 2
    d = TokenizedExample([11, 12], [13, 14])        # 4
    packed = pack_for_training([a, b, c, d], pad_id=0)
    X = IGNORE_INDEX
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5], [11, 12, 13, 14, 0], [6, 7, 8, 9, 10]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert packed["labels"].tolist() == [[X, X, X, 4, 5], [X, X, 13, 14, X], [X, X, 8, X, 10]]
    assert packed["token_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # rows are as long as the padded batch, rounded the same way
    assert pack_for_training([a, b], pad_id=0, pad_to_multiple_of=8)["input_ids"].shape == (1, 8)


def test_the_training_collator_packs_only_where_a_row_is_saved(smollm2_tokenizer):
    long = TraceExample("one two three four five six seven eight nine ten " * 4, "yes")
    short = [TraceExample("one two", "no"), TraceExample("three four", "maybe")]
    collate = TrainingCollator(smollm2_tokenizer, "FOMC", packed=True)
    padded = TrainingCollator(smollm2_tokenizer, "FOMC")([long, *short])
    packed = collate([long, *short])                    # the two short ones share the second row
    assert packed["input_ids"].shape == (2, padded["input_ids"].shape[1])
    assert "attention_mask" not in packed
    assert int(packed["token_mask"].sum()) == int(padded["attention_mask"].sum())
    assert sorted(packed["labels"][packed["labels"] != IGNORE_INDEX].tolist()) == \
        sorted(padded["labels"][padded["labels"] != IGNORE_INDEX].tolist())
    pair = collate([long, short[0]])                    # a pair never packs: padded, as without packing
    assert pair.keys() == {"input_ids", "attention_mask", "labels"}
    assert torch.equal(pair["input_ids"], TrainingCollator(smollm2_tokenizer, "FOMC")([long, short[0]])["input_ids"])


def test_empty_batches_are_rejected():
    with pytest.raises(ValueError, match="empty batch"):
        pad_for_training([], pad_id=0)
    with pytest.raises(ValueError, match="empty batch"):
        pack_for_training([], pad_id=0)
    with pytest.raises(ValueError, match="empty batch"):
        pad_for_generation([], pad_id=0)
    assert torch.equal(pad_for_generation([[5]], pad_id=0)["input_ids"], torch.tensor([[5]]))
