"""`model.source` may name a Hugging Face hub id: it is loaded from the local HF cache (the layout
huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}), never downloaded
while HF_HUB_OFFLINE is set (the tests' and CI's default)."""
import shutil

import huggingface_hub.constants
import pytest

from moram import load_causal_lm
from moram.loading import model_fingerprint, resolve_model_source

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, tiny_lm_dir, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    shutil.copytree(tiny_lm_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / COMMIT


def test_a_hub_id_loads_from_the_local_cache(hub_cache, tiny_lm_dir):
    assert resolve_model_source("acme/tiny-llama") == (hub_cache, None)
    assert resolve_model_source(f"acme/tiny-llama@{COMMIT}") == (hub_cache, None)
    model, tokenizer = load_causal_lm("acme/tiny-llama")
    assert model.config.hidden_size == 32 and tokenizer.pad_token is not None
    assert model_fingerprint("acme/tiny-llama") == model_fingerprint(tiny_lm_dir)


def test_a_hub_id_missing_from_the_cache_is_one_clear_error_offline(hub_cache):
    with pytest.raises(FileNotFoundError, match=r"'acme/other': not a local path, and not in the Hugging Face "
                                                 r"cache .*hub.*HF_HUB_OFFLINE"):
        resolve_model_source("acme/other")


def test_a_local_folder_wins_over_a_hub_id_of_the_same_name(hub_cache, tmp_path, tiny_lm_dir, monkeypatch):
    local = tmp_path / "acme" / "tiny-llama"
    shutil.copytree(tiny_lm_dir, local)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("acme/tiny-llama")[0].resolve() == local.resolve()


def test_the_trace_job_names_a_missing_hub_model_before_ray_starts(hub_cache, tmp_path, trace_root):
    from moram_platform.config import ConfigError, load_config
    from moram_platform.trace.benchmark import TraceBenchmark

    config = load_config(None, overrides=[f"data.root={trace_root}", "data.tasks=[C-STANCE]",
                                          "model.source=acme/missing", f"run.output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match="model.source: model source 'acme/missing'"):
        TraceBenchmark().validate(config)
