"""What every job entry point shares: parse --config/--set/--run-name, validate, then run."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Usable straight from a checkout (``python jobs/trace.py``) as well as when installed.
ROOT = Path(__file__).resolve().parents[1]
for source in (str(ROOT), str(ROOT / "platform")):
    if source not in sys.path:
        sys.path.insert(0, source)

for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)


def parser(description: str, default_config: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=str(ROOT / default_config),
                   help=f"job config YAML (default: {default_config})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-3 --set data.tasks='[C-STANCE,FOMC]'")
    p.add_argument("--run-name", help="run id; rerunning with the same id resumes after the last committed task")
    p.add_argument("--stop-after", type=int, help="stop after this many tasks (resume later with the same --run-name)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def load(args) -> "JobConfig":  # noqa: F821
    from moram_platform.config import ConfigError, load_config

    overrides = list(args.overrides)
    if args.run_name:
        overrides.append(f"run.name={args.run_name}")
    try:
        return load_config(args.config, overrides)
    except ConfigError as error:  # bad input: exit 2 like every other refusal, no traceback
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(2)


def run(config, args) -> int:
    from moram_platform.sequence import run_sequence

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run_sequence(config, stop_after=args.stop_after, progress=not args.quiet)
    except (ValueError, LookupError, FileNotFoundError) as error:
        # Bad input is a clear one-line message, not a traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\n== {result.run_id} ==")
    print(result.table())
    print(f"\nregistry: {result.registry_uri} (versions {result.versions})")
    print(f"MLflow:   {result.mlflow_url}")
    return 0
