"""Continual learning on X-TAIL (CLIP, 10 image domains) with MoRAM, on Ray Train + DeepSpeed,
tracked in MLflow: after every domain, every domain's test set is scored over the union of all
classes (no domain id at test time).

    python jobs/xtail.py --set data.root=/data/xtail                # embedded: local Ray, registry, MLflow
    python jobs/xtail.py --config jobs/configs/xtail/tiny-vit_moram_cpu-smoke.yaml --set data.root=xtail-mini
    ray job submit --working-dir . -- python jobs/xtail.py --run-name my-run --set data.root=s3://bucket/xtail
"""
import sys

from _cli import load, parser, run

if __name__ == "__main__":
    args = parser(__doc__, "jobs/configs/xtail/vit-b-16_moram.yaml").parse_args()
    sys.exit(run(load(args), args))
