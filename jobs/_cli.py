"""What every job entry point shares: parse --config/--set/--run-name, validate, then run."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Usable straight from a checkout (``python jobs/trace.py``) as well as when installed.
ROOT = Path(__file__).resolve().parents[1]
for source in (str(ROOT), str(ROOT / "platform")):
    if source not in sys.path:
        sys.path.insert(0, source)

for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "MLFLOW_CONFIGURE_LOGGING": "false"}.items():
    os.environ.setdefault(key, value)

from moram_platform.credentials import redact  # noqa: E402  (both light; after the path above)
from moram_platform.exits import BAD_INPUT, exit_on_bad_input, refuse  # noqa: E402


def parser(description: str, default_config: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=str(ROOT / default_config),
                   help=f"job config YAML (default: {default_config})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-3 --set data.tasks='[C-STANCE,FOMC]'")
    p.add_argument("--run-name", help="run id; rerunning with the same id resumes after the last committed task")
    p.add_argument("--stop-after", type=int, help="stop after this many tasks (resume later with the same --run-name)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--log-level", choices=("debug", "info", "warning"),
                   help="terminal output: info (default: progress and results; Ray, DeepSpeed and torch output "
                        "go to the run's log file), debug (everything, also Ray's workers) or warning; "
                        "default $MORAM_LOG_LEVEL, else info")
    return p


def load(args) -> "JobConfig":  # noqa: F821
    from moram_platform.config import ConfigError, load_config

    overrides = list(args.overrides)
    if args.run_name:
        overrides.append(f"run.name={args.run_name}")
    try:
        return load_config(args.config, overrides)
    except ConfigError as error:  # bad input: exit 2 like every other refusal, no traceback
        sys.exit(refuse(error, "config error"))


def run(config, args) -> int:
    """Check, then run the sequence; bad input (a check, or a task's data found bad later) is one
    line and exit 2 (moram_platform.exits)."""
    return exit_on_bad_input(lambda: _run(config, args))


def _run(config, args) -> int:
    from moram_platform.benchmark import get_benchmark
    from moram_platform.cluster import start_ray
    from moram_platform.console import JobConsole, default_level
    from moram_platform.preflight import check_model_structure
    from moram_platform.registry.errors import find_disk_full, find_storage_error
    from moram_platform.registry.lease import refuse_if_busy
    from moram_platform.sequence import default_run_id, run_sequence

    level = args.log_level or default_level()
    config.run.name = config.run.name or default_run_id(config)   # names the log file too
    config = config.with_absolute_paths()                # once: the Ray workers read the same files
    # Bad input stops here, before Ray starts:
    check_model_structure(config)                        # targets, dtype, r: on the meta device, no weights
    get_benchmark(config.benchmark).validate(config)     # every task and data file
    refuse_if_busy(config.registry_uri(), config.run.name)   # another driver's run
    log_file = Path(config.run.output_dir).resolve() / "logs" / f"{config.run.name}.log"
    console = JobConsole(level, log_file)
    console.configure_logging()
    print(f"{config.benchmark}: {len(config.data.tasks)} tasks ({', '.join(config.data.tasks)}), "
          f"run {config.run.name}; log: {_shown(log_file)}", flush=True)
    try:
        start_ray(console)
        result = run_sequence(config, stop_after=args.stop_after, progress=not args.quiet, checked=True,
                              on_task_done=_print_row(config.data.tasks))
    except BAD_INPUT:
        raise                                # found late: one line and exit 2 (run)
    except BaseException as error:
        failed = find_storage_error(error)   # storage down or full: nothing partial is visible
        if failed is not None and not isinstance(error, KeyboardInterrupt):
            print(f"error: {failed}\nnothing partial was committed (versions are create-only): once the storage "
                  f"is back, rerun the same command to resume. Full log: {_shown(log_file)}", file=sys.stderr)
            return 1
        tracking = _mlflow_failure(error)    # MLflow down: stop cleanly, the registry keeps the work
        if tracking is not None and not isinstance(error, KeyboardInterrupt):
            print(f"error: MLflow at {redact(config.tracking_uri())} failed: {tracking}\nthe registry "
                  f"keeps every committed task: once MLflow is back, rerun the same command; it fills in what "
                  f"MLflow missed. Full log: {_shown(log_file)}", file=sys.stderr)
            return 1
        full = find_disk_full(error)         # the run folder is full (checkpoints, logs)
        if full is not None and not isinstance(error, KeyboardInterrupt):
            print(f"error: {getattr(full, 'filename', None) or config.run.output_dir}: No space left on device\n"
                  f"nothing partial was committed (versions are create-only): free space under "
                  f"{config.run.output_dir}, then rerun the same command to resume. Full log: {_shown(log_file)}",
                  file=sys.stderr)
            return 1
        print(f"the job failed; its full log: {_shown(log_file)}", file=sys.stderr)
        raise
    print(f"\n== {result.run_id} ==")
    print(result.table())
    print(f"\nregistry: {result.registry_uri} (versions {result.versions})")
    print(f"MLflow:   {result.mlflow_url}")
    if result.versions:
        print(f"generate: {_moram_command()} generate --registry {result.registry_uri} --run {result.run_id} "
              f"--version {result.versions[-1]} \"your prompt\"")
    print(f"log:      {_shown(log_file)}")
    return 0


def _moram_command() -> str:
    """The ``moram`` console script of this interpreter's environment (works from a fresh shell)."""
    script = Path(sys.executable).parent / "moram"
    return str(script) if script.is_file() else "moram"


def _mlflow_failure(error: BaseException) -> str | None:
    """The first line of the MLflow error behind ``error``, if MLflow is what failed."""
    from mlflow.exceptions import MlflowException
    from moram_platform.registry.errors import find_cause

    found = find_cause(error, MlflowException)
    return redact(str(getattr(found, "message", found)).splitlines()[0]) if found is not None else None


def _print_row(tasks: list[str]):
    """After each task: the new row of the accuracy matrix (and the zero-shot row first)."""
    width = max(len(t) for t in tasks)

    def show(index: int, matrix, baseline) -> None:
        if index == 0 and baseline is not None:
            print("  zero-shot: " + "  ".join(f"{t} {v:.1f}" for t, v in zip(tasks, baseline)), flush=True)
        row = matrix[-1]
        print(f"  task {index + 1}/{len(tasks)} {tasks[index]:<{width}} evaluated: "
              + "  ".join(f"{t} {v:.1f}" for t, v in zip(tasks, row)), flush=True)

    return show


def _shown(path: Path) -> str:
    """A path relative to the working directory when it is inside it (shorter to read)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
