"""``python -m moram_platform.stack up|status|down``: the command line of the local stack."""
from __future__ import annotations

import argparse
import sys

from . import __doc__ as PACKAGE_DOC
from .local import STATE_DIR_ENV, LocalStack
from .services import StackError


def describe(stack: LocalStack) -> str:
    return "\n".join([
        f"MoRAM local stack (state: {stack.state_dir})",
        f"  Ray dashboard    {stack.dashboard_url}",
        f"  Ray (GCS)        {stack.ray_address}",
        f"  MLflow           {stack.mlflow_uri}",
        f"  S3 (SeaweedFS)   {stack.s3_endpoint}   bucket {stack.bucket}",
        f"  registry         {stack.registry_uri}",
        f"  MLflow artifacts {stack.artifacts_uri}",
        "",
        "Environment for jobs and clients:",
        *(f"  export {key}={value}" for key, value in stack.public_env().items()),
        f"  source {stack.env_file}   # all of the above plus the S3 keys and the MLflow user/password",
        "",
        "Submit a job (after `source stack.env`: ray reads the token from RAY_AUTH_TOKEN_PATH; jobs take",
        "the S3 keys and MLflow user from the Ray head, not from the runtime env):",
        f"  ray job submit --address {stack.dashboard_url} --working-dir . -- python jobs/trace.py \\",
        "      --config jobs/configs/trace/smollm2-135m_moram_cpu-smoke.yaml --set data.root=$PWD/../shared/datasets/TRACE-500",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moram_platform.stack", description=PACKAGE_DOC.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", default=None,
                        help=f"where the stack keeps its data, ports and keys (default ${STATE_DIR_ENV} or ~/.moram/stack)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs the Ray head offers (default: all)")
    args = parser.parse_args(argv)
    try:
        stack = LocalStack(args.state_dir)
        if args.command == "up":
            before = stack.state.get("ports")
            stack.up(num_cpus=args.num_cpus)
            if before and before != stack.ports:
                print(f"note: some recorded ports were taken; new ones are in {stack.env_file}")
            print(describe(stack))
            return 0
        if args.command == "down":
            stopped = stack.down()
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}; data kept in {stack.state_dir}")
            return 0
        if not stack.state:
            print(f"no stack in {stack.state_dir} (run up)")
            return 3
        report = stack.status()
        for name, item in report.items():
            state = "healthy" if item["healthy"] else "running, not answering" if item["running"] else "stopped"
            print(f"{name:<10} {state:<24} pid {item['pid'] or '-':<8} {item['url']}")
        print(f"environment: source {stack.env_file}")
        return 0 if all(item["healthy"] for item in report.values()) else 1
    except StackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
