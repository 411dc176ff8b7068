"""Checks of the model's structure before Ray starts (moram_platform.preflight): the real
SmolLM2-135M and open_clip ViT-B-16 built on the meta device by the benchmarks' own loaders."""
import json
import os
import subprocess
import sys

import pytest

from moram_platform.benchmark import get_benchmark
from moram_platform.config import ConfigError, load_config
from moram_platform.preflight import check_model_structure
from fixtures.paths import PROJECT_ROOT, TRACE_500

pytestmark = pytest.mark.timeout(300)
SMOKE = PROJECT_ROOT / "jobs" / "configs" / "trace" / "smollm2-135m_moram_cpu-smoke.yaml"
VIT_B_16 = PROJECT_ROOT / "jobs" / "configs" / "xtail" / "vit-b-16_moram.yaml"
TINY_VIT = PROJECT_ROOT / "jobs" / "configs" / "xtail" / "tiny-vit_moram_cpu-smoke.yaml"
SMOLLM2_PROJECTIONS = "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"


def trace_config(*overrides):
    return load_config(SMOKE, [f"data.root={TRACE_500}", *overrides]).with_absolute_paths()


def vit_config(*overrides):   # ViT-B-16's architecture; no weights are needed to check its structure
    return load_config(VIT_B_16, ["data.root=/nonexistent", "xtail.pretrained=null", "xtail.allow_random_init=true",
                                  *overrides]).with_absolute_paths()


def refusal(config) -> str:
    with pytest.raises(ConfigError) as caught:
        check_model_structure(config)
    return str(caught.value)


def test_a_target_module_the_model_lacks_stops_the_job_before_ray_with_one_line(tmp_path):
    """The whole entry point: exit 2, one line naming the key and the nearest names, and nothing
    written (no run folder, no MLflow store, no Ray session: RAY_TMPDIR would hold it)."""
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray"), "MORAM_CACHE_DIR": str(tmp_path / "cache")}
    job = subprocess.run([sys.executable, str(PROJECT_ROOT / "jobs" / "trace.py"), "--config", str(SMOKE), "--quiet",
                          "--set", f"data.root={TRACE_500}", "--set", "moram.target_modules=[q_proj,qproj]"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert job.returncode == 2, job.stdout[-2000:] + job.stderr[-2000:]
    assert job.stderr.strip().splitlines() == [
        "error: moram.target_modules: 'qproj' names no module of this model (nearest: ['q_proj', 'v_proj', "
        f"'o_proj']; its projections are named {SMOLLM2_PROJECTIONS})"], job.stderr
    assert job.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override, message", [
    ("moram.target_modules=[no_such_proj]",
     "moram.target_modules: 'no_such_proj' names no module of this model (nearest: "),
    ("moram.target_modules=[q_proj,mlp]",
     "moram.target_modules: 'mlp' names LlamaMLP modules, which MoRAM cannot wrap (it wraps nn.Linear and Conv1D)"),
    ("moram.target_modules=[embed_tokens]", "moram.target_modules: 'embed_tokens' names Embedding modules"),
    ("moram.target_modules=.*attn",
     f"moram.target_modules: the regex '.*attn' matches no nn.Linear/Conv1D module of this model; its projections "
     f"are named {SMOLLM2_PROJECTIONS}"),
    # SmolLM2's k_proj is 576 -> 192 (3 of 9 heads for keys): 193 atoms cannot be independent.
    ("moram.r=193", "moram.r: 193 is more than the width of layer model.layers.0.self_attn.k_proj (576 -> 192)"),
])
def test_smollm2_refusals_name_the_key(override, message):
    assert refusal(trace_config(override)).startswith(message)


def test_what_the_model_has_passes_in_either_dtype():
    check_model_structure(trace_config("moram.r=192"))                     # the width itself is fine
    check_model_structure(trace_config("model.dtype=bfloat16", "moram.target_modules=[gate_proj,down_proj]"))
    check_model_structure(trace_config("moram.target_modules=model\\.layers\\.0\\..*_proj"))


def test_the_skeleton_is_the_loaders_model_without_weights():
    """empty_model builds what load_model builds: the same modules, shapes and dtypes, on meta."""
    config = trace_config("model.dtype=bfloat16")
    benchmark = get_benchmark("trace")
    empty = benchmark.empty_model(config)
    loaded, _ = benchmark.load_model(config)
    assert {p.device.type for p in empty.parameters()} == {"meta"}
    assert [(n, p.shape, p.dtype) for n, p in empty.named_parameters()] == \
           [(n, p.shape, p.dtype) for n, p in loaded.named_parameters()]


def test_a_quantized_checkpoint_is_refused(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64).to_dict()
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = refusal(trace_config(f"model.source={tmp_path}", "moram.r=2", "moram.k=2"))
    assert message.startswith("model.source: a quantized checkpoint (bitsandbytes)")


def test_vit_b_16_targets_after_the_attention_split():
    """X-TAIL's six targets exist only once nn.MultiheadAttention is split into q/k/v/out_proj:
    the check sees the model as the workers wrap it."""
    check_model_structure(vit_config())
    assert refusal(vit_config("moram.target_modules=[q_proj,c_fcc]")).startswith(
        "moram.target_modules: 'c_fcc' names no module of this model (nearest: ['c_fc']")
    assert refusal(vit_config("moram.target_modules=[ln_1]")).startswith(
        "moram.target_modules: 'ln_1' names LayerNorm modules")
    assert refusal(vit_config("moram.r=769", "moram.alpha=769")).startswith(
        "moram.r: 769 is more than the width of layer visual.transformer.resblocks.0.attn.q_proj (768 -> 768)")


def test_xtail_job_with_a_bad_target_is_refused_before_its_data_is_read(tmp_path):
    """The X-TAIL entry point refuses before its data check (which would save new few-shot
    splits): data.root does not even exist, and the refusal is the target's."""
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray")}
    job = subprocess.run([sys.executable, str(PROJECT_ROOT / "jobs" / "xtail.py"), "--config", str(TINY_VIT),
                          "--quiet", "--set", "data.root=/nonexistent", "--set", f"xtail.split_dir={tmp_path / 'splits'}",
                          "--set", "moram.target_modules=[c_fc,mlp_c_proj]"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert job.returncode == 2, job.stdout[-2000:] + job.stderr[-2000:]
    (line,) = job.stderr.strip().splitlines()
    assert line.startswith("error: moram.target_modules: 'mlp_c_proj' names no module of this model (nearest: "), line
    assert list(tmp_path.iterdir()) == []
