"""Ray Tune sweep of a MoRAM job: τ, k (and lr) by training trials, then δ by evaluation only.

    python jobs/tune.py tune_spaces/trace.yaml --name trace-smollm2 --best-config-out best.yaml
    python jobs/tune.py tune_spaces/trace.yaml --name trace-smollm2     # again: resumes the sweep
    python jobs/trace.py --config best.yaml                              # train with the winner
    ray job submit --working-dir . -- python jobs/tune.py tune_spaces/trace.yaml --name trace-smollm2
"""
import argparse
import logging
import sys

from _cli import ROOT  # noqa: F401  (puts the checkout's packages on sys.path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("space", help="sweep space YAML (tune_spaces/<benchmark>.yaml)")
    p.add_argument("--name", help="sweep name; rerunning with the same name resumes the sweep (default: "
                                  "<space>-<UTC time>, printed at the start)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the base job config, e.g. --set mlflow.tracking_uri=http://mlflow:5000")
    p.add_argument("--space-set", dest="space_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the space file, e.g. --space-set search.num_samples=4")
    p.add_argument("--best-config-out", help="write the best configuration here as a job config")
    p.add_argument("--storage-path", help="where Tune keeps the sweep's state (default <run.output_dir>/tune/<name>; "
                                          "shared storage such as s3://bucket/tune on a multi-node cluster)")
    p.add_argument("--train-only", action="store_true",
                   help="stop after the training stage; rerun with the same --name to add the δ stage")
    p.add_argument("--quiet", action="store_true", help="no Tune progress tables")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from moram_platform.exits import BAD_INPUT, exit_on_bad_input
    from moram_platform.tune import SweepError

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # bad input, and a sweep no trial of which finished (SweepError): one clear line, exit 2
    return exit_on_bad_input(lambda: sweep(args), errors=BAD_INPUT + (SweepError,))


def sweep(args) -> int:
    from moram_platform.tune import load_space, run_sweep

    space = load_space(args.space, args.space_overrides)
    result = run_sweep(space, args.name, job_overrides=args.overrides, storage_path=args.storage_path,
                       best_config_out=args.best_config_out, train_only=args.train_only, verbose=not args.quiet)
    print(f"\n== sweep {result.name} ==")
    print(result.table())
    print(f"\nbest: {result.best_params}  objective {result.best.objective:.4f} ({result.best.stage} trial "
          f"{result.best.trial_id})")
    if result.best_config_path:
        print(f"best config: {result.best_config_path}  (python jobs/{result.best_config.get('benchmark', 'trace')}.py "
              f"--config {result.best_config_path})")
    print(f"MLflow:      {result.mlflow_url}")
    print(f"Tune state:  {result.storage_path}  (rerun with --name {result.name} to resume)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
