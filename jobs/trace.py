"""Continual learning on TRACE with MoRAM (or a baseline), on Ray Train + DeepSpeed, tracked in MLflow.

    python jobs/trace.py                                   # embedded: local Ray, registry, MLflow
    python jobs/trace.py --config jobs/configs/trace/smollm2-135m_seqlora.yaml --run-name my-run
    ray job submit --working-dir . -- python jobs/trace.py --run-name my-run
"""
import sys

from _cli import load, parser, run

if __name__ == "__main__":
    args = parser(__doc__, "jobs/configs/trace/smollm2-135m_moram.yaml").parse_args()
    sys.exit(run(load(args), args))
