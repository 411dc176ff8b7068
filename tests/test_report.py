"""The comparison report without MLflow: grouping, mean ± std by hand, mean matrices, paper
anchors where the setting matches, and its files (the MLflow side: tests/test_study.py)."""
import csv
import io
import json
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest

from fixtures.paths import PROJECT_ROOT
from moram_platform.plots import activation_heatmap
from moram_platform.report import (ReportError, RunRecord, StudyReport, load_anchors, mean_std, read_run_records,
                                   records_report, setting_of, summarize_runs)

ORDER_1 = ["dbpedia", "amazon", "yahoo", "agnews"]


def record(run, group, op, bwt, tasks=("a", "b"), matrix=None, **extra):
    return RunRecord(run, group, list(tasks), {"OP": op, "BWT_eq10": bwt, "_method": group, **extra}, matrix)


def test_mean_and_sample_std_per_group_by_hand():
    records = [record("m-s0", "moram", 60.0, 2.0, matrix=[[50.0, 10.0], [40.0, 80.0]]),
               record("m-s1", "moram", 70.0, 4.0, matrix=[[70.0, 20.0], [60.0, 80.0]]),
               record("i-s0", "inclora", 30.0, 9.0)]
    groups = summarize_runs(records, anchors=[])
    assert [g.group for g in groups] == ["moram", "inclora"]
    moram, inclora = groups
    # mean (60 + 70) / 2 = 65; sample std sqrt(((60-65)^2 + (70-65)^2) / (2-1)) = sqrt(50) = 7.0711
    assert moram.stats["OP"] == pytest.approx((65.0, 50 ** 0.5, 2))
    assert moram.stats["BWT_eq10"] == pytest.approx((3.0, 2 ** 0.5, 2))
    assert inclora.stats["OP"] == (30.0, None, 1)          # one run: no std
    assert moram.mean_matrix == [[60.0, 15.0], [50.0, 80.0]] and moram.matrix_columns == ["a", "b"]
    assert inclora.mean_matrix is None
    assert mean_std([1.0, 2.0, 6.0]) == pytest.approx((3.0, 7 ** 0.5, 3))   # deviations -2, -1, 3: 14 / 2


def test_several_orders_average_by_position():
    records = [record("o1", "moram", 1.0, 0.0, tasks=("a", "b"), matrix=[[10.0, 0.0], [20.0, 30.0]]),
               record("o2", "moram", 1.0, 0.0, tasks=("b", "a"), matrix=[[30.0, 0.0], [40.0, 50.0]])]
    group, = summarize_runs(records, anchors=[])
    assert group.matrix_columns == ["task 1", "task 2"]
    assert group.mean_matrix == [[20.0, 0.0], [30.0, 40.0]]


def test_paper_numbers_stand_beside_a_matching_setting_only():
    anchors = [{"setting": "standard-cl-4", "method": "moram", "metric": "OP", "value": "77.6",
                "table": "Table 2", "row": "MoRAM", "note": ""}]
    matching = [record("m", "moram", 50.0, 1.0, tasks=ORDER_1)]
    other = [record("m", "moram", 50.0, 1.0, tasks=("C-STANCE", "FOMC"))]
    assert summarize_runs(matching, anchors)[0].paper == {"OP": (77.6, "Table 2, MoRAM", None)}
    assert summarize_runs(other, anchors)[0].paper == {}
    assert setting_of(["agnews", "yahoo", "amazon", "dbpedia"]) == "standard-cl-4"
    assert setting_of(["FOMC"]) is None
    report = StudyReport("t", summarize_runs(matching, anchors), [])
    assert "50.00 ± - [77.6]" in report.markdown()
    with_std = [{**anchors[0], "std": "0.4"}]
    assert "50.00 ± - [77.6 ± 0.4]" in StudyReport("t", summarize_runs(matching, with_std), []).markdown()


def test_a_bwt_anchor_of_unknown_variant_stands_beside_both_bwt_columns():
    anchors = [{"setting": "standard-cl-4", "method": "moram", "metric": "BWT", "value": "1.5", "std": "",
                "table": "README", "row": "MoRAM", "note": ""}]
    runs = [record("m", "moram", 50.0, 2.0, tasks=ORDER_1, reference_forgetting_magnitude=1.0)]
    group, = summarize_runs(runs, anchors)
    assert group.paper == {"BWT_eq10": (1.5, "README, MoRAM", None), "forgetting_ref": (1.5, "README, MoRAM", None)}
    text = StudyReport("t", [group], []).markdown()
    assert "| 2.00 ± - [1.5] | 1.00 ± - [1.5] |" in text and "stands beside both" in text


def test_the_shipped_anchor_file_has_the_columns():
    rows = load_anchors()
    text = __import__("importlib.resources").resources.files("moram_platform").joinpath(
        "data/paper_anchors.csv").read_text()
    assert next(csv.reader(io.StringIO(text))) == ["setting", "model", "method", "metric", "value", "std", "table",
                                                   "row", "note"]
    assert all(float(row["value"]) >= -100 for row in rows)


TRACE_8 = ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]
XTAIL_10 = ["Aircraft", "Caltech101", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet", "Cars", "SUN397"]


def test_the_shipped_paper_numbers_stand_beside_runs_of_the_same_setting_and_model():
    # Golden: Artificer-AI-Lab/MoRAM README.md (aaa51d8), TRACE table row "Gemma-2B-it / MoRAM": overall
    # performance 36.27, backward transfer 2.74; X-TAIL table row "MoRAM": Last 80.9.
    def runs(tasks, model, method="moram"):
        return [RunRecord(f"{method}-s{seed}", method, list(tasks), {"OP": 30.0 + seed, "BWT_eq10": 3.0,
                                                                       "_method": method}, None, model=model)
                for seed in range(2)]

    gemma, = summarize_runs(runs(TRACE_8, "google/gemma-2b-it"))
    # its "Backward Transfer" does not say which variant: beside both BWT columns
    source = "MoRAM README TRACE table, Gemma-2B-it / MoRAM"
    assert gemma.paper == {"OP": (36.27, source, None), "BWT_eq10": (2.74, source, None),
                           "forgetting_ref": (2.74, source, None)}
    assert "30.50 ± 0.71 [36.27]" in StudyReport("t", [gemma], []).markdown()
    olora, = summarize_runs(runs(TRACE_8, "/models/Llama-2-7b-chat-hf", method="olora"))
    assert olora.paper["OP"][0] == 42.78 and olora.paper["BWT_eq10"][0] == 7.16
    clip, = summarize_runs(runs(XTAIL_10, "open_clip:ViT-B-16"))
    assert clip.paper["OP"][0] == 80.9
    # another model, or 7 of the 8 tasks: no paper number (the paper has none for that setting)
    assert summarize_runs(runs(TRACE_8, "HuggingFaceTB/SmolLM2-135M-Instruct"))[0].paper == {}
    assert summarize_runs(runs(TRACE_8[:2] + TRACE_8[3:], "google/gemma-2b-it"))[0].paper == {}
    assert summarize_runs(runs(TRACE_8, ""))[0].paper == {}


def test_report_files(tmp_path):
    records = [record("m-s0", "moram", 60.0, 2.0, matrix=[[50.0, 10.0], [40.0, 80.0]], FWT=1.0),
               record("m-s1", "moram", 70.0, 4.0, matrix=[[70.0, 20.0], [60.0, 80.0]], FWT=3.0),
               record("i-s0", "inclora", 30.0, 9.0, FWT=0.5)]
    report = StudyReport("Study t", summarize_runs(records, anchors=[]), ["late-run"])
    text = report.markdown()
    assert "| moram | 2 | 65.00 ± 7.07 | 3.00 ± 1.41 | 2.00 ± 1.41 |" in text
    assert "| inclora | 1 | 30.00 ± - | 9.00 ± - | 0.50 ± - |" in text
    assert "Not finished (left out): late-run" in text
    assert "| b | 50.00 | 80.00 |" in text           # the mean matrix
    rows = list(csv.DictReader(io.StringIO(report.csv())))
    assert rows[0] == {"method": "moram", "metric": "OP", "mean": "65.0000", "std": "7.0711", "n": "2", "paper": "",
                       "paper_std": "", "paper_source": "", "runs": "m-s0 m-s1"}
    names = {p.name for p in report.write(tmp_path)}
    assert names == {"report.md", "report.csv", "metrics.png", "matrix_moram.png"}   # no records: no runs.jsonl


def test_kept_run_records_give_back_the_same_report(tmp_path):
    # A study's numbers outlive its MLflow store: runs.jsonl written by one report, read by the next.
    records = [record("m-s0", "moram", 60.0, 2.0, matrix=[[50.0, None], [40.0, 80.0]], FWT=1.0),
               record("i-s0", "inclora", 30.0, 9.0)]
    records[0].routing = [[0.75, 0.25], [0.5, 0.5]]
    first = records_report(records, "Study t")
    assert (tmp_path / "runs.jsonl") in first.write(tmp_path)
    more = tmp_path / "more.jsonl"           # another machine's runs: one new, one already kept
    more.write_text(json.dumps(asdict(record("m-s1", "moram", 70.0, 4.0, matrix=[[70.0, None], [60.0, 80.0]]))) +
                    "\n\n" + json.dumps(asdict(record("m-s0", "moram", 0.0, 0.0))) + "\n")
    kept = read_run_records([tmp_path / "runs.jsonl", more])
    assert [r.run for r in kept] == ["m-s0", "i-s0", "m-s1"]        # the first record of a run id wins
    assert kept[0] == records[0]                                      # None cells and routing survive
    moram, inclora = records_report(kept, "Study t").groups
    assert moram.stats["OP"] == pytest.approx((65.0, 50 ** 0.5, 2))   # (60 + 70) / 2, sqrt(50) as above
    assert moram.mean_matrix == [[60.0, None], [50.0, 80.0]]         # a cell no run evaluated stays absent
    assert inclora.stats["OP"] == (30.0, None, 1)


@pytest.mark.parametrize("line, message", [
    ("{not json", "not a JSON object"),
    ("[1, 2]", "not a JSON object"),
    ('{"run": "r", "group": "g", "tasks": []}', "missing metrics"),
    ('{"run": "r", "group": "g", "tasks": [], "metrics": {}, "colour": 1}', "unknown colour"),
    ('{"run": "r", "group": "g", "tasks": [], "metrics": {"OP": "high"}}', "metrics must map names to numbers"),
])
def test_a_bad_run_record_names_its_file_and_line(tmp_path, line, message):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(asdict(record("ok", "moram", 1.0, 0.0))) + "\n" + line + "\n")
    with pytest.raises(ReportError, match=f"{path}:2: {message}"):
        read_run_records([path])
    with pytest.raises(ReportError, match="cannot read the run records"):
        read_run_records([tmp_path / "absent.jsonl"])


def test_activation_heatmap_blocks_tasks_and_orders_layers(tmp_path):
    # 30 layers x 4 projections (SmolLM2-sized): 120 rows collapse to 4 layer types.
    rng = np.random.default_rng(0)
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(30) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    blocks = {n: [8, 8 - (i % 3), 8] for i, n in enumerate(names)}     # task 2 pruned in some layers
    mass = {n: rng.random(sum(b)) for n, b in blocks.items()}
    path = activation_heatmap(mass, tmp_path / "many.png", title="atom activation during FOMC (version 3) " * 3,
                              task_atoms=blocks, task_names=["C-STANCE", "FOMC", "ScienceQA"])
    assert path.stat().st_size > 0
    few = {n: mass[n] for n in names[:8]}
    path = activation_heatmap(few, tmp_path / "few.png", task_atoms={n: blocks[n] for n in few},
                              task_names=["C-STANCE", "FOMC", "ScienceQA"])
    assert path.stat().st_size > 0


def test_the_report_command_reads_kept_runs_without_mlflow(tmp_path):
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(asdict(record(f"m-s{seed}", "moram", op, 1.0))) + "\n"
                            for seed, op in enumerate((60.0, 70.0))))
    study = [sys.executable, str(PROJECT_ROOT / "jobs" / "study.py"), "report", "kept"]
    done = subprocess.run([*study, "--runs", str(runs), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| moram | 2 | 65.00 ± 7.07 |" in done.stdout          # as test_mean_and_sample_std_per_group_by_hand
    assert read_run_records([tmp_path / "out" / "runs.jsonl"]) == read_run_records([runs])
    runs.write_text(runs.read_text() + "{oops\n")
    done = subprocess.run([*study, "--runs", str(runs)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: {runs}:3: not a JSON object (Expecting property name " \
                                                   "enclosed in double quotes)"
