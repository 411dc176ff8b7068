"""TRACE's training loss projects onto the vocabulary only where an answer token is predicted:
the same loss and the same gradients as Hugging Face's ``model(**batch).loss``, which projects
every position (the reference here), on the real SmolLM2-135M and real standard-CL batches."""
import pytest
import torch

from moram_platform.benchmark import get_benchmark
from moram_platform.config import load_config
from moram_platform.trace.benchmark import answer_token_loss
from moram_platform.training import build_moram_model
from fixtures.paths import PROJECT_ROOT, TRACE_500

CONFIG = PROJECT_ROOT / "jobs" / "configs" / "standard-cl" / "smollm2-135m_moram_order1-cpu.yaml"


@pytest.mark.slow
def test_the_answer_only_loss_equals_the_full_projection_loss_in_value_and_gradients():
    config = load_config(CONFIG, [f"data.root={TRACE_500}", "moram.dropout=0.0"])
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
    for name, (a, b) in reference_grads.items():
        torch.testing.assert_close(mine_grads[name][0], a, rtol=1e-4, atol=1e-7, msg=f"{name}.A")
        torch.testing.assert_close(mine_grads[name][1], b, rtol=1e-4, atol=1e-7, msg=f"{name}.B")
    scored = int((batch["labels"] != -100).sum())
    assert 3 <= scored <= 3 * 6                     # a label or two and EOS per example
