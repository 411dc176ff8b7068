"""``moram-registry`` / ``python -m moram_platform.registry``: look at a registry from a shell.

    moram-registry list                                  # runs
    moram-registry list trace-run                        # versions of a run
    moram-registry show trace-run [VERSION]              # a manifest (default: latest)
    moram-registry verify trace-run [VERSION]            # every shard's presence, size, sha256
    moram-registry --uri s3://bucket/moram export trace-run 3 ./trace-run-v3
"""
from __future__ import annotations

import argparse
import sys

from .errors import RegistryError, ShardIntegrityError, VersionNotFoundError
from .manifest import Version
from .registry import REGISTRY_URI_ENV, Registry, default_registry_uri


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        registry = Registry(args.uri)
        return args.command(registry, args)
    except (RegistryError, FileExistsError) as error:
        print(f"moram-registry: error: {error}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moram-registry", description="Inspect a MoRAM memory registry.")
    parser.add_argument("--uri", default=default_registry_uri(),
                        help=f"registry: a path, file://... or s3://bucket/prefix (default: ${REGISTRY_URI_ENV} "
                             "or ./moram_runs); S3 endpoint and credentials come from the AWS environment")
    commands = parser.add_subparsers(dest="name", required=True)

    listing = commands.add_parser("list", help="list runs, or the versions of RUN")
    listing.add_argument("run", nargs="?")
    listing.set_defaults(command=_list)

    for name, handler, text in (("show", _show, "print a version's manifest"),
                                ("verify", _verify, "check every shard of a version")):
        sub = commands.add_parser(name, help=f"{text} (default: the latest)")
        sub.add_argument("run")
        sub.add_argument("version", nargs="?", default="latest", type=_version_arg)
        sub.set_defaults(command=handler)

    export = commands.add_parser("export", help="copy a verified version into a local folder")
    export.add_argument("run")
    export.add_argument("version", type=_version_arg, help="a version number or 'latest'")
    export.add_argument("dest", help="an absent or empty folder")
    export.set_defaults(command=_export)
    return parser


def _version_arg(text: str) -> int | str:
    if text == "latest":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a version number or 'latest', got {text!r}") from None


def _resolve(registry: Registry, run: str, version: int | str) -> Version:
    if version != "latest":
        return registry.version(run, version)
    latest = registry.latest(run)
    if latest is None:
        raise VersionNotFoundError(f"run {run} has no versions in {registry.uri}")
    return latest


def _list(registry: Registry, args) -> int:
    if args.run is None:
        rows = [("RUN", "VERSIONS", "LATEST TASK")]
        for run in registry.runs():
            latest = registry.latest(run)
            rows.append((run, str(latest.version if latest else 0), latest.task if latest else "-"))
    else:
        rows = [("VERSION", "TASK", "SHARD", "SIZE", "CREATED", "METRICS")]
        for number in registry.versions(args.run):
            v = registry.version(args.run, number)
            rows.append((str(v.version), v.task, v.shard.sha256[:12], _size(v.shard.size), v.created_at,
                         _metrics(v.metrics)))
    _print_table(rows)
    return 0


def _show(registry: Registry, args) -> int:
    print(_resolve(registry, args.run, args.version).to_json().decode())
    return 0


def _verify(registry: Registry, args) -> int:
    version = _resolve(registry, args.run, args.version)
    try:
        registry.verify(args.run, version.version)
    except ShardIntegrityError as error:
        print(f"run {args.run} version {version.version}: FAILED", file=sys.stderr)
        for problem in str(error).split("; "):
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"run {args.run} version {version.version}: OK ({len(version.shards)} shards, "
          f"{_size(version.size)} checked)")
    return 0


def _export(registry: Registry, args) -> int:
    version = _resolve(registry, args.run, args.version)
    dest = registry.export(args.run, version.version, args.dest)
    print(f"exported run {args.run} version {version.version} to {dest} "
          f"(manifest.json + {len(version.shards)} shards, {_size(version.size)})")
    return 0


def _size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _metrics(metrics: dict) -> str:
    scalars = [f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
               for key, value in metrics.items() if isinstance(value, (int, float, str))]
    return " ".join(scalars) or "-"


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
