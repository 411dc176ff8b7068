"""What a job prints, and what it keeps in its log file.

By default (level ``info``) the terminal gets the job's own progress and results: the
``moram``/``moram_platform`` loggers at INFO, the training bars of the Ray Train workers, and
every ERROR (from any library, on the driver or a worker). Everything else -- Ray, DeepSpeed,
torch and MLflow start-up chatter, repeated internal warnings, the workers' own output -- goes
to the job's log file only. Level ``debug`` (``--log-level debug`` or ``MORAM_LOG_LEVEL=debug``)
shows everything on the terminal as well, at DEBUG, and asks Ray to log its workers at DEBUG
(``ray.LoggingConfig``).
"""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

LEVELS = ("debug", "info", "warning")
LEVEL_ENV = "MORAM_LOG_LEVEL"
OWN_LOGGERS = ("moram", "moram_platform")
# Worker lines the terminal shows even when quiet: records logged as errors. (Tracebacks that
# Ray prints while retrying internally are not; a failure that stops the job reaches the driver
# as an exception, with its traceback.)
_ALARM = re.compile(r"\b(ERROR|CRITICAL|FATAL)\b")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def default_level() -> str:
    level = os.environ.get(LEVEL_ENV, "info").lower()
    if level not in LEVELS:
        raise ValueError(f"{LEVEL_ENV}: expected one of {', '.join(LEVELS)}, got {level!r}")
    return level


class JobConsole:
    """Routes the driver's logging and the Ray workers' output between terminal and log file."""

    def __init__(self, level: str, log_file: Path):
        self.level = level
        self.verbose = level == "debug"
        self.log_file = log_file
        self._file_handler: _LazyFileHandler | None = None
        self._handlers: list[logging.Handler] = []

    # -- the driver's Python logging -----------------------------------------------------------
    def configure_logging(self) -> None:
        """Terminal: our loggers (and every library's errors); file: everything, opened lazily
        (a job stopped by bad input writes nothing)."""
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # MLflow logs through ours
        root = logging.getLogger()
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        root.setLevel(logging.DEBUG if self.verbose else logging.INFO)
        terminal = logging.StreamHandler(sys.stderr)
        if self.verbose:
            terminal.setFormatter(logging.Formatter(_FORMAT))
        else:
            terminal.setFormatter(logging.Formatter("%(message)s"))
            terminal.addFilter(_OwnOrSevere(logging.WARNING if self.level == "warning" else logging.INFO))
        self._file_handler = _LazyFileHandler(self.log_file)
        self._file_handler.setFormatter(logging.Formatter(_FORMAT))
        self._handlers = [terminal, self._file_handler]
        for handler in self._handlers:
            root.addHandler(handler)
        logging.captureWarnings(True)  # library warnings (torch, transformers) are log records too

    def reclaim_ray_logger(self) -> None:
        """Ray gives its ``ray`` logger a terminal handler of its own; send its records
        through ours instead (call before and after ``ray.init``)."""
        root = logging.getLogger()
        for handler in root.handlers[:]:
            if handler not in self._handlers:
                root.removeHandler(handler)
        ray_logger = logging.getLogger("ray")
        for handler in ray_logger.handlers[:]:
            ray_logger.removeHandler(handler)
        ray_logger.propagate = True
        ray_logger.setLevel(logging.DEBUG if self.verbose else logging.INFO)

    # -- Ray -----------------------------------------------------------------------------------
    def ray_init_kwargs(self) -> dict:
        """The workers log at the job's level (``ray.LoggingConfig``); the driver keeps ours."""
        import ray

        job_config = ray.job_config.JobConfig()
        job_config.set_py_logging_config(ray.LoggingConfig(encoding="TEXT", log_level=self.level.upper()))
        return {"job_config": job_config, "configure_logging": False, "log_to_driver": True}

    def route_worker_output(self) -> None:
        """Install, before ``ray.init``, a filter in front of the driver's printer of worker
        output: progress bars and errors reach the terminal, every line reaches the log file."""
        if self.verbose:
            return
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        if getattr(dispatcher, "_moram_routed", False):
            return
        add_handler = dispatcher.add_handler

        def routed_add_handler(name, handler):
            add_handler(name, self._worker_filter(handler) if name == "ray_print_logs" else handler)

        dispatcher.add_handler = routed_add_handler
        dispatcher._moram_routed = True

    def _worker_filter(self, print_to_terminal):
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

        # Ray redraws a worker's bar with tqdm on the driver; into a pipe or a file every redraw
        # becomes new lines (~190 for the quickstart), so there a bar is one line when it ends.
        plain_bars = None if sys.stderr.isatty() else _PlainBars()

        def handle(data: dict) -> None:
            lines = data.get("lines", [])
            if data.get("pid") == "autoscaler":  # its periodic status report: events only, as Ray does
                lines = [line for line in lines if ":event_summary:" in line or "Warning" in line or "Error" in line]
            bars = [line for line in lines if RAY_TQDM_MAGIC in line]
            shown = [line for line in lines if _ALARM.search(line) and RAY_TQDM_MAGIC not in line]
            quiet = [line for line in lines if RAY_TQDM_MAGIC not in line]
            if quiet:
                self._write_raw(data, quiet)
            if plain_bars is None:
                shown = bars + shown
            else:
                plain_bars.update(bars)
            if shown:
                print_to_terminal({**data, "lines": shown})

        return handle

    def _write_raw(self, data: dict, lines: list[str]) -> None:
        if self._file_handler is None:
            return
        who = data.get("actor_name") or data.get("task_name") or "worker"
        prefix = f"({who} pid={data.get('pid')}) "
        self._file_handler.write_lines(prefix + line for line in lines)


class _PlainBars:
    """Worker progress bars for a terminal that is not a TTY: one line per bar, when it closes
    (``train SST-2 [1/3] loss 0.048: 16/16 step in 43 s``)."""

    def __init__(self, stream=None):
        self.stream = stream
        self.started: dict[str, float] = {}
        self.closed: set[str] = set()   # a bar may report its closed state more than once

    def update(self, lines: list[str]) -> None:
        import json
        import time

        for line in lines:
            try:
                state = json.loads(line)
            except ValueError:
                continue
            uuid = state.get("uuid")
            if uuid in self.closed:
                continue
            if not state.get("closed"):
                self.started.setdefault(uuid, time.monotonic())
                continue
            self.closed.add(uuid)
            started = self.started.pop(uuid, None)   # None: opened and closed within one flush
            seconds = time.monotonic() - started if started is not None else 0.0
            x, total = state.get("x", 0), state.get("total")
            done = f" {x}/{total} {state.get('unit', 'it')}" if total and total > 1 else ""
            took = f" in {seconds:.0f} s" if seconds >= 1 else ""   # a time the driver saw, not a flush
            text = f"{state.get('desc', '')}:{done}{took}" if done or took else state.get("desc", "")
            print(text, file=self.stream or sys.stderr, flush=True)


class _OwnOrSevere(logging.Filter):
    """Our loggers from ``level`` up; any other logger only for errors."""

    def __init__(self, level: int):
        super().__init__()
        self.own_level = level

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".")[0] in OWN_LOGGERS or record.name == "__main__"
        return record.levelno >= (self.own_level if own else logging.ERROR)


class _LazyFileHandler(logging.FileHandler):
    """A file handler that creates its folder and file on the first record only."""

    def __init__(self, path: Path):
        self.path = Path(path)
        super().__init__(self.path, delay=True, encoding="utf-8")

    def _open(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def write_lines(self, lines) -> None:
        self.acquire()
        try:
            if self.stream is None:
                self.stream = self._open()
            for line in lines:
                self.stream.write(line.rstrip("\n") + "\n")
            self.stream.flush()
        except OSError as error:
            self._report(error)
        finally:
            self.release()

    def handleError(self, record) -> None:
        self._report(sys.exc_info()[1])

    def _report(self, error) -> None:
        """A log file that cannot be written (a full disk) is one warning, not a traceback per record."""
        if not getattr(self, "_reported", False):
            self._reported = True
            print(f"warning: cannot write the log file {self.path}: {getattr(error, 'strerror', None) or error}",
                  file=sys.stderr)

    @property
    def written(self) -> bool:
        return self.path.is_file()
