"""TRACE's training loss projects onto the vocabulary only where an answer token is predicted,
and its micro-batches are packed: the same loss and the same gradients as Hugging Face's
``model(**batch).loss`` over the padded batch, which projects every position (the reference
here), on the real SmolLM2-135M and real standard-CL batches; the packing check tells a model
that keeps packed examples apart from one that does not."""
import pytest
import torch

from moram_platform.benchmark import get_benchmark
from moram_platform.config import load_config
from moram_platform.trace.benchmark import answer_token_loss
from moram_platform.training import build_moram_model
from fixtures.paths import PROJECT_ROOT, TRACE_500

CONFIG = PROJECT_ROOT / "jobs" / "configs" / "standard-cl" / "smollm2-135m_moram_order1-cpu.yaml"


def _assert_same_gradients(mine, reference):
    """A gradient entry is a sum over ~1000 tokens, so fp32 rounding in it scales with the
    tensor's largest entry, not with the entry itself: a near-zero entry summed in another order
    (packed rows, the fused training update) may move by ~1e-7 absolute. A packing or masking
    defect moves entries by the gradient's own size, far outside 1e-5 of the largest."""
    for name, (a, b) in reference.items():
        for which, mine_grad, grad in (("A", mine[name][0], a), ("B", mine[name][1], b)):
            torch.testing.assert_close(mine_grad, grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()),
                                       msg=lambda m: f"{name}.{which}: {m}")


@pytest.mark.slow
def test_the_answer_only_loss_equals_the_full_projection_loss_in_value_and_gradients():
    config = load_config(CONFIG, [f"data.root={TRACE_500}", "moram.dropout=0.0", "trace.pack_training=false"])
    benchmark = get_benchmark("trace")
    model, tokenizer = build_moram_model(config, benchmark, [], torch.device("cpu"))
    model.begin_task("yahoo")
    with torch.no_grad():  # trained atoms: B = 0 at the start would give the atoms no gradient
        for layer in model.moram_layers.values():
            layer.B.normal_(0, 0.02)
    model.train()
    # yahoo's prompts differ in length (right padding inside the batch), answers are 1-5 tokens
    examples = benchmark.train_examples(config, "yahoo")[:3]
    batch = benchmark.collate(config, tokenizer, "yahoo", examples)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3

    def loss_and_grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        grads = {name: (layer.A.grad.clone(), layer.B.grad.clone()) for name, layer in model.moram_layers.items()}
        return loss.detach(), grads

    reference, reference_grads = loss_and_grads(lambda: model(**batch).loss)
    mine, mine_grads = loss_and_grads(lambda: answer_token_loss(model, batch))
    torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)
    _assert_same_gradients(mine_grads, reference_grads)
    scored = int((batch["labels"] != -100).sum())
    assert 3 <= scored <= 3 * 6                     # a label or two and EOS per example


@pytest.mark.slow
def test_a_packed_batch_gives_the_padded_batchs_loss_gradients_and_statistics():
    """yahoo's 8 prompts (117-580 tokens: the longest holds a row alone, the others share) in
    fewer rows; the reference is the padded batch through Hugging Face's own loss."""
    padded_config = load_config(CONFIG, [f"data.root={TRACE_500}", "moram.dropout=0.0", "trace.pack_training=false"])
    packed_config = load_config(CONFIG, [f"data.root={TRACE_500}", "moram.dropout=0.0"])
    assert packed_config.trace.pack_training                 # the default
    benchmark = get_benchmark("trace")
    model, tokenizer = build_moram_model(packed_config, benchmark, [], torch.device("cpu"))
    model.begin_task("yahoo")
    with torch.no_grad():
        for layer in model.moram_layers.values():
            layer.B.normal_(0, 0.02)
    model.train()
    examples = benchmark.train_examples(packed_config, "yahoo")[:8]
    padded = benchmark.collate(padded_config, tokenizer, "yahoo", examples)
    packed = benchmark.collate(packed_config, tokenizer, "yahoo", examples)
    assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1]
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert int(packed["token_mask"].sum()) == int(padded["attention_mask"].sum())

    def run(loss_fn):
        model.zero_grad(set_to_none=True)
        model.set_activation_stats({name: torch.zeros(0) for name in model.moram_layers})   # as a task starts
        loss = loss_fn()
        loss.backward()
        grads = {name: (layer.A.grad.clone(), layer.B.grad.clone()) for name, layer in model.moram_layers.items()}
        stats = model.activation_stats()
        return loss.detach(), grads, stats

    reference, reference_grads, reference_stats = run(lambda: model(**padded).loss)
    mine, mine_grads, mine_stats = run(lambda: answer_token_loss(model, packed))
    torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)
    _assert_same_gradients(mine_grads, reference_grads)
    for name, mass in reference_stats.items():   # the filler counts in no statistic, as padding does not
        assert float(mass.sum()) > 0
        torch.testing.assert_close(mine_stats[name], mass, rtol=1e-4, atol=1e-4, msg=name)


class _PositionBlindLM(torch.nn.Module):
    """A causal LM whose mixing is a running mean over the row: causal, but blind to where
    positions restart, so packed examples see each other."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.head = torch.nn.Linear(8, 32)

    def forward(self, input_ids, position_ids=None, use_cache=None):
        h = self.embed(input_ids)
        h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1).view(1, -1, 1)
        return type("Output", (), {"logits": self.head(h)})()


@pytest.mark.slow
def test_the_packing_check_passes_smollm2_and_refuses_a_model_blind_to_restarting_positions():
    from moram_platform.trace.benchmark import keeps_packed_examples_apart

    for dtype in ("float32", "bfloat16"):                      # rounding is not leaking
        config = load_config(CONFIG, [f"data.root={TRACE_500}", f"model.dtype={dtype}"])
        model, _ = get_benchmark("trace").load_model(config)  # the check ran inside, and passed
        assert keeps_packed_examples_apart(model)
    torch.manual_seed(0)
    assert not keeps_packed_examples_apart(_PositionBlindLM())
