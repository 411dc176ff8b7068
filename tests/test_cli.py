"""The `moram` command: generate, evaluate, compare, config, registry; every user error is one
line on stderr and exit status 2."""
import json
import subprocess
import sys

import pytest
from fixtures.memory import RUN, TASK
from fixtures.models import tiny_llama

from moram import MoRAMConfig, get_moram_model, model_fingerprint
from moram_platform.cli import main
from moram_platform.runs import CompareError, compare_runs, format_table
from moram_platform.registry import BaseModelRef, Registry
from moram_platform.registry.evaluations import read_evaluation, record_evaluation
from moram_platform.tracking import Tracker

CONFIG = "jobs/configs/trace/smollm2-135m_moram.yaml"


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.fixture
def tiny_run(tmp_path, capsys):
    """A local registry whose run 'tiny' (one task) was trained on a tiny LLaMA saved in a folder."""
    model_dir = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=2, k=2, dropout=0.0))
    model.begin_task("C-STANCE")
    model.end_task()
    root = tmp_path / "registry"
    Registry(str(root)).commit("tiny", model.export_shard(),
                               base_model=BaseModelRef(str(model_dir), model_fingerprint(model_dir)))
    capsys.readouterr()   # drop the progress bars of save_pretrained
    return root, model_dir


# -- config ----------------------------------------------------------------------------------
def test_config_show_prints_the_resolved_yaml(capsys):
    import yaml

    assert main(["config", "show", CONFIG, "--set", "train.lr=0.001"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["lr"] == 0.001 and shown["benchmark"] == "trace"
    assert main(["config", "validate", CONFIG]) == 0
    assert capsys.readouterr().out.strip() == f"{CONFIG}: valid"


def test_config_errors_name_the_key(capsys, tmp_path):
    assert main(["config", "validate", CONFIG, "--set", "train.lr=-1"]) == 2
    assert _error_line(capsys).startswith("moram: error: train.lr:")
    assert main(["config", "show", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml not found" in _error_line(capsys)


# -- generate: errors before any model loads -------------------------------------------------
def test_bad_prompt_line_is_refused_with_file_and_line(capsys, tmp_path, tiny_run):
    root, _ = tiny_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n\n{"text": "no prompt key"}\n')
    assert main(["generate", "--registry", str(root), "--run", "tiny", "--input", str(prompts)]) == 2
    assert _error_line(capsys) == (f"moram: error: {prompts}:3: expected a JSON object with a non-empty string "
                                   """'prompt' (or a JSON string), got '{"text": "no prompt key"}'""")
    prompts.write_text('{"prompt": "fine"}\n{not json\n')
    assert main(["generate", "--registry", str(root), "--run", "tiny", "--input", str(prompts)]) == 2
    assert _error_line(capsys).startswith(f"moram: error: {prompts}:2: not valid JSON")


def test_unknown_run_or_version_is_one_line(capsys, registry_uri, tiny_run):
    root, _ = tiny_run
    assert main(["generate", "--registry", registry_uri, "--run", "nope", "hello"]) == 2
    assert _error_line(capsys) == f"moram: error: run nope has no versions in {Registry(registry_uri).uri}"
    assert main(["generate", "--registry", str(root), "--run", "tiny", "--version", "5", "hello"]) == 2
    assert "run tiny: version 5 does not exist" in _error_line(capsys)


def test_another_base_model_than_the_runs_is_refused(capsys, tmp_path, tiny_run):
    root, model_dir = tiny_run
    other = tmp_path / "other-llama"
    tiny_llama(seed=1).save_pretrained(other)
    capsys.readouterr()
    assert main(["generate", "--registry", str(root), "--run", "tiny", "--base-model", str(other), "hi"]) == 2
    line = _error_line(capsys)
    assert f"trained on base model '{model_dir}' (revision {model_fingerprint(model_dir)})" in line
    assert f"has revision {model_fingerprint(other)}" in line

    (model_dir / "model.safetensors").unlink()         # the run's own base model lost its weights
    assert main(["generate", "--registry", str(root), "--run", "tiny", "hi"]) == 2
    assert _error_line(capsys) == (f"moram: error: run tiny version 1: base model folder {model_dir} has no weights "
                                   "(*.safetensors or *.bin) (pass the model with --base-model)")
    assert main(["generate", "--registry", str(root), "--run", "tiny", "--base-model", str(tmp_path / "x"), "hi"]) == 2
    assert "base model '" + str(tmp_path / "x") + "' is not a local model: " in _error_line(capsys)


def test_exit_status_and_no_traceback_in_a_fresh_process(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("[1, 2]\n")
    done = subprocess.run([sys.executable, "-m", "moram_platform.cli", "generate", "--run", "r", "--input",
                           str(prompts)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"moram: error: {prompts}:1: expected a JSON object with a "
                                                "non-empty string 'prompt' (or a JSON string), got '[1, 2]'"]


def test_registry_commands_are_reachable(capsys, tiny_run):
    root, _ = tiny_run
    assert main(["registry", "--uri", str(root), "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "C-STANCE" in out


# -- evaluate: reuse of recorded scores ------------------------------------------------------
def test_evaluate_reuses_the_sequences_record_without_loading_a_model(capsys, tiny_run, trace_root):
    root, _ = tiny_run
    registry = Registry(str(root))
    recorded = {"task": "C-STANCE", "metric": "accuracy", "score": 12.5, "n": 2, "profile": "moram-repo"}
    record_evaluation(registry, "tiny", 1, "moram-repo", {"C-STANCE": recorded})
    args = ["evaluate", "--registry", str(root), "--run", "tiny", "--version", "1", "--tasks", "C-STANCE",
            "--set", f"data.root={trace_root}", "--set", "data.max_eval_examples=2"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "C-STANCE: reusing the score recorded in the sequence's record (moram-repo)" in captured.err
    assert "12.50" in captured.out and "recorded earlier" in captured.out
    assert main(args[:-2] + ["--tasks", "NoSuchTask"]) == 2
    assert "NoSuchTask" in _error_line(capsys)


@pytest.mark.slow
def test_generate_and_evaluate_with_a_real_memory(capsys, trained_memory, tmp_path, trace_root):
    capsys.readouterr()
    root = str(trained_memory.registry_root)
    assert main(["generate", "--registry", root, "--run", RUN, "--max-new-tokens", "4",
                 "What is the capital of France?"]) == 0
    assert capsys.readouterr().out.strip()

    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"id": 1, "prompt": trained_memory.prompt}) + "\n" + json.dumps("Say hi.") + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--registry", root, "--run", RUN, "--version", "1", "--no-chat-template",
                 "--max-new-tokens", "4", "--input", str(prompts), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row.get("id") for row in rows] == [1, None] and all(isinstance(row["output"], str) for row in rows)
    assert rows[1]["prompt"] == "Say hi."

    args = ["evaluate", "--registry", root, "--run", RUN, "--version", "1", "--tasks", TASK, "--quiet",
            "--set", f"data.root={trace_root}", "--set", "data.max_eval_examples=2", "--set", "eval.max_new_tokens=4"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "reusing" not in first.err and f"{TASK}  accuracy" in first.out
    record = read_evaluation(Registry(root), RUN, 1, f"moram-repo@{TASK}-n2-t4")
    assert record["scores"][TASK]["n"] == 2
    assert main(args) == 0
    second = capsys.readouterr()
    assert f"{TASK}: reusing the score recorded in moram-repo@{TASK}-n2-t4" in second.err
    assert second.out == first.out.replace(")\n", ", recorded earlier)\n")


# -- compare ---------------------------------------------------------------------------------
def test_compare_reads_the_sequences_summaries_from_mlflow(mlflow_server):
    experiment = "compare-test"
    for run, method, op in (("moram-s0", "moram", 61.25), ("inclora-s0", "inclora", 40.0)):
        tracker = Tracker(mlflow_server.uri, experiment, run)
        parent, _ = tracker.start_sequence({"moram": {"method": method}}, {"moram.method": method,
                                                                          "moram.model": "smollm2"})
        tracker.log_metrics(parent, {"OP": op, "BWT_signed": -2.5, "BWT_eq10": 2.5, "FWT": 1.0,
                                     "transfer/FOMC": 3.0})
        tracker.finish(parent)
    rows = compare_runs(mlflow_server.uri, experiment, ["inclora-s0", "moram-s0"])
    assert [(r["run"], r["method"], r["OP"], r["BWT_eq10"]) for r in rows] == [
        ("inclora-s0", "inclora", 40.0, 2.5), ("moram-s0", "moram", 61.25, 2.5)]
    assert "transfer/FOMC" not in rows[0]
    table = format_table(rows).splitlines()
    assert table[0].split() == ["run", "method", "model", "status", "OP", "BWT_signed", "BWT_eq10", "FWT"]
    assert table[2].split() == ["moram-s0", "moram", "smollm2", "FINISHED", "61.25", "-2.50", "2.50", "1.00"]
    assert len(compare_runs(mlflow_server.uri, experiment)) == 2
    with pytest.raises(CompareError, match="has no sequence named ghost"):
        compare_runs(mlflow_server.uri, experiment, ["ghost"])
    with pytest.raises(CompareError, match="experiment 'nope' does not exist"):
        compare_runs(mlflow_server.uri, "nope")
