"""The moram-registry CLI on both backends: list, show, verify, export, and its errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moram_platform.registry import BaseModelRef, Registry, shard_key
from moram_platform.registry.cli import main
from moram_platform.testing.shards import synthetic_shard

pytestmark = pytest.mark.timeout(120)

RUN = "trace-run"


@pytest.fixture
def registry(registry_uri):
    registry = Registry(registry_uri)
    for i, task in enumerate(["C-STANCE", "FOMC"]):
        registry.commit(RUN, synthetic_shard(task, i, seed=i), base_model=BaseModelRef("smollm2", "abc123"),
                        metrics={"accuracy": 60.5 + i})
    return registry


def cli(registry, *args):
    return main(["--uri", registry.uri, *args])


def test_list_runs_and_versions(registry, capsys):
    assert cli(registry, "list") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["RUN", "VERSIONS", "LATEST", "TASK"]
    assert out[1].split() == [RUN, "2", "FOMC"]

    assert cli(registry, "list", RUN) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[:3] for row in rows] == [["1", "C-STANCE", registry.version(RUN, 1).shard.sha256[:12]],
                                         ["2", "FOMC", registry.version(RUN, 2).shard.sha256[:12]]]
    assert rows[1][-1] == "accuracy=61.5"


def test_show_prints_the_manifest(registry, capsys):
    assert cli(registry, "show", RUN) == 0  # latest
    assert json.loads(capsys.readouterr().out) == registry.version(RUN, 2).to_manifest()
    assert cli(registry, "show", RUN, "1") == 0
    assert json.loads(capsys.readouterr().out)["task"] == {"name": "C-STANCE", "index": 0}


def test_verify_passes_then_names_the_damaged_shard(registry, capsys):
    assert cli(registry, "verify", RUN) == 0
    assert f"run {RUN} version 2: OK (2 shards" in capsys.readouterr().out
    key = shard_key(RUN, registry.version(RUN, 1).shard.sha256)
    registry.storage.write(key, registry.storage.read(key)[:-10])
    assert cli(registry, "verify", RUN, "2") == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and key in err and "truncated" in err


def test_export_copies_a_version(registry, tmp_path, capsys):
    dest = tmp_path / "exported"
    assert cli(registry, "export", RUN, "latest", str(dest)) == 0
    assert str(dest) in capsys.readouterr().out
    assert json.loads((dest / "manifest.json").read_text())["version"] == 2
    assert sorted(p.name for p in (dest / "shards").iterdir()) == sorted(
        f"{ref.sha256}.safetensors" for ref in registry.version(RUN, 2).shards)
    assert cli(registry, "export", RUN, "1", str(dest)) == 1  # not empty any more
    assert "not an empty folder" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["show", RUN, "7"], "version 7 does not exist"),
    (["show", "../etc"], "contains a path separator or '..'"),
    (["show", "no-such-run"], "run no-such-run has no versions"),
])
def test_errors_are_one_line_and_exit_1(registry, capsys, args, message):
    assert cli(registry, *args) == 1
    err = capsys.readouterr().err
    assert err.startswith("moram-registry: error: ") and message in err and "Traceback" not in err


def test_bad_version_argument_is_a_usage_error(registry, capsys):
    with pytest.raises(SystemExit) as caught:
        cli(registry, "show", RUN, "newest")
    assert caught.value.code == 2 and "expected a version number or 'latest'" in capsys.readouterr().err


def test_module_and_console_script_use_the_env_uri(tmp_path):
    registry = Registry(tmp_path / "registry")
    registry.commit(RUN, synthetic_shard("C-STANCE", 0), base_model="smollm2")
    env = {**os.environ, "MORAM_REGISTRY_URI": str(tmp_path / "registry")}
    script = Path(sys.executable).parent / "moram-registry"
    for command in ([sys.executable, "-m", "moram_platform.registry", "list", RUN], [str(script), "list", RUN]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[1].split()[:2] == ["1", "C-STANCE"]
