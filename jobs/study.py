"""Run a study: a grid of continual-learning sequences (methods x seeds x orders, or any config
key) as Ray Tune trials under one MLflow parent, then the comparison report.

    python jobs/study.py studies/trace-methods.yaml --name methods-v1
    python jobs/study.py studies/trace-methods.yaml --name methods-v1        # again: resumes, skips finished
    python jobs/study.py report methods-v1 --grid studies/trace-methods.yaml --out report/
    python jobs/study.py report methods-v1 --runs docs/results/methods-v1.runs.jsonl   # kept records, no MLflow
    ray job submit --working-dir . -- python jobs/study.py studies/standard-cl-orders.yaml --name std-cl
"""
import argparse
import logging
import sys

from _cli import ROOT  # noqa: F401  (puts the checkout's packages on sys.path)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="grid file (studies/<name>.yaml)")
    p.add_argument("--name", required=True, help="study name; rerunning with the same name resumes the study")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of every point's job config, e.g. --set mlflow.tracking_uri=http://mlflow:5000")
    p.add_argument("--storage-path", help="where Tune keeps the study's state (default <run.output_dir>/study/<name>)")
    p.add_argument("--runs", action="append", default=[], metavar="FILE",
                   help="runs kept in this runs.jsonl (a report's --out writes one) count as finished: their "
                        "points are not run again and their numbers join the report; repeatable")
    p.add_argument("--out", help="also write the report files (Markdown, CSV, runs.jsonl, plots) here")
    p.add_argument("--quiet", action="store_true", help="no Tune progress tables")
    return p


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="study.py report", description="the comparison report of a study")
    p.add_argument("name", help="the study name")
    p.add_argument("--grid", help="the study's grid file: the MLflow store and experiment come from its config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (instead of --grid)")
    p.add_argument("--experiment", help="MLflow experiment (instead of --grid)")
    p.add_argument("--runs", action="append", default=[], metavar="FILE",
                   help="also report the finished runs kept in this runs.jsonl (a report's --out writes one); "
                        "repeatable; a run MLflow also has is taken from MLflow")
    p.add_argument("--out", help="write report.md, report.csv, runs.jsonl and the plots here")
    p.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from moram_platform.exits import BAD_INPUT, exit_on_bad_input
    from moram_platform.tune import SweepError

    # bad input (a StudyError, ConfigError, ReportError... are ValueErrors): one clear line, exit 2
    return exit_on_bad_input(lambda: report(argv[1:]) if argv[:1] == ["report"] else run(argv),
                             errors=BAD_INPUT + (SweepError,))


def run(argv) -> int:
    from moram_platform.report import ReportError, read_run_records, report_study, with_kept_runs
    from moram_platform.tune.study import load_study, run_study

    args = run_parser().parse_args(argv)
    kept = read_run_records(args.runs)          # bad files fail here, before Ray starts
    result = run_study(load_study(args.grid), args.name, job_overrides=args.overrides,
                       storage_path=args.storage_path, verbose=not args.quiet, kept_runs={r.run for r in kept})
    kept = [r for r in kept if r.run in {p.run_id for p in result.points}]    # another study's runs stay out
    try:
        report = with_kept_runs(report_study(result), kept, f"Study {result.name}")
    except ReportError:         # nothing finished in MLflow: every point was kept
        report = with_kept_runs(None, kept, f"Study {result.name}")
    print(f"\n== study {result.name}: {len(result.points)} sequences ({len(result.skipped)} finished before) ==")
    print(report.markdown())
    if args.out:
        print("report files: " + ", ".join(str(p) for p in report.write(args.out)))
    for run_id, error in result.failed.items():
        print(f"FAILED {run_id}: {error}", file=sys.stderr)
    print(f"MLflow:     {result.mlflow_url}")
    print(f"Tune state: {result.storage_path}  (rerun with --name {result.name} to resume)")
    return 1 if result.failed else 0


def report(argv) -> int:
    from moram_platform.config import config_from_dict
    from moram_platform.report import ReportError, read_run_records, study_report, with_kept_runs
    from moram_platform.tune.study import base_raw, load_study

    args = report_parser().parse_args(argv)
    kept = read_run_records(args.runs)          # bad files fail here, before MLflow is asked
    uri, experiment = args.tracking_uri, args.experiment
    if args.grid:
        config = config_from_dict(base_raw(load_study(args.grid), args.overrides))
        uri, experiment = uri or config.tracking_uri(), experiment or config.mlflow.experiment or config.benchmark
    if not (uri and experiment) and not args.runs:
        raise ValueError("give --grid FILE, or --tracking-uri and --experiment, or --runs FILE")
    found = None
    if uri and experiment:
        try:
            found = study_report(uri, experiment, args.name)
        except ReportError:
            if not kept:            # MLflow may not know a study whose runs were kept in files
                raise
    result = with_kept_runs(found, kept, f"Study {args.name}")
    print(result.csv() if args.format == "csv" else result.markdown())
    if args.out:
        print("report files: " + ", ".join(str(p) for p in result.write(args.out)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
