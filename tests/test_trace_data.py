"""TRACE data loading and validation: real TRACE-500 files, malformed files, and S3."""
import json
import uuid

import pytest

from fixtures.s3 import TEST_BUCKET
from moram_platform.trace.data import (
    KNOWN_GAPS,
    STANDARD_CL_TASKS,
    TRACE_ORDER,
    TraceDataError,
    TraceExample,
    available_tasks,
    load_labels,
    load_split,
    validate_tasks,
)

# Sizes stated in ../shared/datasets/README.md.
TEST_SIZES = {task: 100 for task in TRACE_ORDER} | {"NumGLUE-cm": 81}
EVAL_SIZES = {task: 100 for task in TRACE_ORDER} | {"NumGLUE-cm": 41}


def _raw_rows(root, task, split):
    return json.loads((root / task / f"{split}.json").read_text(encoding="utf-8"))


# -- real data ---------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TRACE_ORDER)
def test_every_trace_task_loads_its_test_split(trace_root, task):
    examples = load_split(trace_root, task, "test")
    assert len(examples) == TEST_SIZES[task]
    assert all(isinstance(e, TraceExample) and isinstance(e.prompt, str) and isinstance(e.answer, str)
               for e in examples)
    rows = _raw_rows(trace_root, task, "test")
    assert [(e.prompt, e.answer) for e in examples] == [(r["prompt"], r["answer"]) for r in rows]


def test_validate_a_whole_order_up_front(trace_root):
    counts = validate_tasks(trace_root, TRACE_ORDER, splits=("eval", "test"))
    assert counts == {task: {"eval": EVAL_SIZES[task], "test": TEST_SIZES[task]} for task in TRACE_ORDER}


def test_standard_cl_tasks_load_with_their_labels(trace_root):
    counts = validate_tasks(trace_root, STANDARD_CL_TASKS, splits=("test",))
    assert set(counts) == set(STANDARD_CL_TASKS)
    # agnews/labels.json, as shipped
    assert load_labels(trace_root, "agnews") == ["World", "Sports", "Business", "Science or Technology"]
    assert load_labels(trace_root, "FOMC") is None  # TRACE tasks carry no labels.json
    assert {"FOMC", "agnews", "MeetingBank"} <= set(available_tasks(trace_root))


def test_max_examples_keeps_the_first_n_in_file_order(trace_root):
    first = load_split(trace_root, "FOMC", "train", max_examples=3)
    rows = _raw_rows(trace_root, "FOMC", "train")[:3]
    assert [(e.prompt, e.answer) for e in first] == [(r["prompt"], r["answer"]) for r in rows]
    assert load_split(trace_root, "FOMC", "train", max_examples=3) == first
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_examples"):
            load_split(trace_root, "FOMC", "train", max_examples=bad)


def test_meetingbank_train_is_missing_and_never_substituted(trace_root):
    with pytest.raises(TraceDataError) as err:
        load_split(trace_root, "MeetingBank", "train")
    message = str(err.value)
    assert str(trace_root / "MeetingBank" / "train.json") in message
    assert "no MeetingBank train split" in message
    assert "No other split is substituted" in message
    assert len(load_split(trace_root, "MeetingBank", "eval")) == 100


def test_validating_the_training_splits_reports_meetingbank_only(trace_root):
    with pytest.raises(TraceDataError) as err:
        validate_tasks(trace_root, TRACE_ORDER, splits=("train",))
    message = str(err.value)
    assert message.startswith("1 problem(s)")
    assert "MeetingBank/train.json" in message and "no MeetingBank train split" in message


def test_unknown_task_lists_the_available_ones(trace_root):
    with pytest.raises(TraceDataError, match=r"unknown task 'FOMX'; available under .*C-STANCE, CB, .*FOMC"):
        load_split(trace_root, "FOMX", "test")


def test_unknown_split_name(trace_root):
    with pytest.raises(TraceDataError, match=r"unknown split 'dev' for task 'FOMC'; choose one of train, eval, test"):
        load_split(trace_root, "FOMC", "dev")


# -- malformed files (written to tmp) ------------------------------------------------------------
def _write(root, task, split, content: str):
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.json").write_text(content, encoding="utf-8")
    return folder / f"{split}.json"


GOOD_ROW = {"prompt": "Q:", "answer": "A"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"prompt": "Q:", "answer": "A"},', r"not valid JSON \(Expecting value at line 1, column 34\)"),
        ('{"prompt": "Q:", "answer": "A"}', r"expected a JSON list of .* got a JSON dict"),
        ("[]", "contains no examples"),
        (json.dumps([GOOD_ROW, GOOD_ROW, "just text"]), r"row 2: expected an object .* got a JSON str"),
        (json.dumps([GOOD_ROW, {"answer": "B"}]), r'row 1: missing "prompt"'),
        (json.dumps([GOOD_ROW, GOOD_ROW, GOOD_ROW, {"prompt": "Q:", "answer": 7}]),
         r'row 3: "answer" must be a string, got int'),
        (json.dumps([{"prompt": None, "answer": "A"}]), r'row 0: "prompt" must be a string, got NoneType'),
    ],
)
def test_malformed_file_errors_name_the_file_and_row(tmp_path, content, message):
    path = _write(tmp_path, "Toy", "test", content)
    with pytest.raises(TraceDataError, match=f"^{path}: {message}"):
        load_split(tmp_path, "Toy", "test")


def test_not_utf8(tmp_path):
    path = _write(tmp_path, "Toy", "test", "")
    path.write_bytes(b'[{"prompt": "\xff", "answer": "A"}]')
    with pytest.raises(TraceDataError, match=f"^{path}: not UTF-8 text"):
        load_split(tmp_path, "Toy", "test")


def test_missing_split_of_an_ordinary_task_says_which_exist(tmp_path):
    _write(tmp_path, "Toy", "eval", json.dumps([GOOD_ROW]))
    _write(tmp_path, "Toy", "test", json.dumps([GOOD_ROW]))
    with pytest.raises(TraceDataError, match=r"Toy/train.json: task 'Toy' has no 'train' split; it has: eval, test"):
        load_split(tmp_path, "Toy", "train")


def test_validate_reports_every_problem_at_once(tmp_path):
    _write(tmp_path, "Good", "test", json.dumps([GOOD_ROW]))
    _write(tmp_path, "BadRow", "test", json.dumps([GOOD_ROW, {"prompt": "Q:"}]))
    _write(tmp_path, "BadLabels", "test", json.dumps([GOOD_ROW]))
    (tmp_path / "BadLabels" / "labels.json").write_text('["yes", 1]', encoding="utf-8")
    with pytest.raises(TraceDataError) as err:
        validate_tasks(tmp_path, ["Good", "BadRow", "BadLabels", "Missing"], splits=("test",))
    lines = str(err.value).splitlines()
    assert lines[0].startswith("3 problem(s)")
    assert lines[1] == f'- {tmp_path / "BadRow" / "test.json"}: row 1: missing "answer"'
    assert lines[2] == f"- {tmp_path / 'BadLabels' / 'labels.json'}: entry 1: expected a label string, got int"
    assert lines[3].startswith(f"- {tmp_path / 'Missing'}: unknown task 'Missing'; available under")


def test_file_uri_root(trace_root):
    assert load_split(f"file://{trace_root}", "FOMC", "test", max_examples=2) == load_split(
        trace_root, "FOMC", "test", max_examples=2)


def test_missing_root_is_named(tmp_path):
    with pytest.raises(TraceDataError, match=f"TRACE data root {tmp_path / 'nowhere'} does not exist"):
        load_split(tmp_path / "nowhere", "FOMC", "test")


# -- S3 (a real S3-compatible server on loopback) ---------------------------------------------------
@pytest.fixture
def s3_trace_root(s3_server, trace_root):
    """FOMC and MeetingBank copied as-is to a fresh prefix, plus one malformed task."""
    prefix = f"trace-data-{uuid.uuid4().hex[:8]}/TRACE-500"
    client = s3_server.client()
    for task in ("FOMC", "MeetingBank", "agnews"):
        for file in sorted((trace_root / task).glob("*.json")):
            client.put_object(Bucket=TEST_BUCKET, Key=f"{prefix}/{task}/{file.name}", Body=file.read_bytes())
    bad = json.dumps([GOOD_ROW, GOOD_ROW, {"prompt": 3, "answer": "A"}]).encode()
    client.put_object(Bucket=TEST_BUCKET, Key=f"{prefix}/Broken/test.json", Body=bad)
    return f"s3://{TEST_BUCKET}/{prefix}"


def test_s3_root_loads_the_same_examples(s3_trace_root, trace_root):
    assert load_split(s3_trace_root, "FOMC", "test") == load_split(trace_root, "FOMC", "test")
    assert load_split(s3_trace_root, "FOMC", "train", max_examples=5) == load_split(trace_root, "FOMC", "train")[:5]
    assert load_labels(s3_trace_root, "agnews") == load_labels(trace_root, "agnews")
    assert available_tasks(s3_trace_root) == ["Broken", "FOMC", "MeetingBank", "agnews"]


def test_s3_errors_name_the_object(s3_trace_root):
    with pytest.raises(TraceDataError, match=f"^{s3_trace_root}/MeetingBank/train.json: .*no MeetingBank train"):
        load_split(s3_trace_root, "MeetingBank", "train")
    with pytest.raises(TraceDataError, match=f"^{s3_trace_root}/Broken/test.json: row 2: \"prompt\" must be a string"):
        load_split(s3_trace_root, "Broken", "test")
    with pytest.raises(TraceDataError, match=r"unknown task 'C-STANCE'; available under .*: Broken, FOMC, MeetingBank"):
        load_split(s3_trace_root, "C-STANCE", "test")
    with pytest.raises(TraceDataError) as err:
        validate_tasks(s3_trace_root, ["FOMC", "MeetingBank", "Broken"], splits=("train", "test"))
    assert str(err.value).splitlines()[1:] == [
        f"- {s3_trace_root}/MeetingBank/train.json: {KNOWN_GAPS['MeetingBank', 'train']}",
        f"- {s3_trace_root}/Broken/train.json: task 'Broken' has no 'train' split; it has: test",
        f'- {s3_trace_root}/Broken/test.json: row 2: "prompt" must be a string, got int',
    ]
