"""What a job prints: worker progress bars on a terminal that is not a TTY (a pipe, a CI log)
become one line per bar; worker chatter goes to the log file; errors still reach the terminal."""
import io
import json
import logging

import pytest

from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

from moram_platform.console import JobConsole, _PlainBars


def bar_state(x, closed=False, total=16, desc="  train sst2 [1/3]"):
    # The payload a Ray worker prints for its bar (ray.experimental.tqdm_ray.tqdm._get_state).
    return json.dumps({"__magic_token__": RAY_TQDM_MAGIC, "x": x, "pos": 0, "desc": desc, "total": total,
                       "unit": "step", "ip": "127.0.0.1", "pid": 42, "uuid": "bar-1", "closed": closed})


def test_a_bar_is_one_line_when_it_closes():
    out = io.StringIO()
    bars = _PlainBars(stream=out)
    bars.update([bar_state(x) for x in range(0, 16)])
    assert out.getvalue() == ""
    bars.update([bar_state(16, closed=True), bar_state(16, closed=True)])   # Ray may send the last state twice
    [line] = out.getvalue().splitlines()
    assert line == "  train sst2 [1/3]: 16/16 step"   # opened and closed within a second: no time shown


def test_a_bar_seen_only_closed_is_its_description():
    # An evaluation bar of one task, opened and closed within one flush: no count, no time.
    out = io.StringIO()
    _PlainBars(stream=out).update([bar_state(1, closed=True, total=1, desc="  eval version 1: SST-2 70.0")])
    assert out.getvalue() == "  eval version 1: SST-2 70.0\n"


@pytest.fixture
def root_logging():
    # JobConsole takes over the root logger, as a job's driver does; give pytest's back after.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def test_worker_output_is_routed_when_not_a_tty(tmp_path, capsys, root_logging):
    console = JobConsole("info", tmp_path / "logs" / "job.log")
    console.configure_logging()
    shown = []
    handle = console._worker_filter(shown.append)   # pytest captures stderr: not a TTY
    data = {"pid": 42, "actor_name": "RayTrainWorker", "lines": [
        "[2026-12-02 05:00:00,000 I 42] deepspeed: initialising process group",
        *[bar_state(x) for x in range(3)],
        "ERROR: shard write failed",
    ]}
    handle(data)
    handle({**data, "lines": [bar_state(16, closed=True)]})
    assert [d["lines"] for d in shown] == [["ERROR: shard write failed"]]
    log = (tmp_path / "logs" / "job.log").read_text()
    assert "deepspeed: initialising process group" in log and RAY_TQDM_MAGIC not in log
    assert "train sst2 [1/3]: 16/16 step" in capsys.readouterr().err
