"""Memory-registry benchmark: commit and load of a realistic task shard, local vs S3, and the
commit time of version 50 vs version 1 (it must be flat: a commit never lists the run).

The shard is what one task adds to a 32-layer, 4096-wide model at r=8 on q, k, v, o in bf16
(~17 MB). S3 is a SeaweedFS server on loopback started by this script, so the numbers measure
the protocol, not a network.

    python bench/registry_bench.py [--versions 50] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moram import read_shard
from moram_platform.registry import BaseModelRef, Registry
from moram_platform.stack.seaweed import SeaweedServer
from moram_platform.testing.shards import synthetic_shard

BASE = BaseModelRef("llama-7b-like", revision="bench")
BUCKET = "moram-bench"


def realistic_shard(task_index: int) -> bytes:
    return synthetic_shard(f"task{task_index}", task_index, num_layers=32, width=4096, r=8,
                           dtype=torch.bfloat16, seed=task_index)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(registry: Registry, versions: int, repeats: int) -> dict[str, float]:
    shard = realistic_shard(0)
    # the floor: one plain put / get of the same bytes, no protocol around it
    put = statistics.median(timed(lambda i=i: registry.storage.write(f"bench-raw/{i}.bin", shard))[0]
                            for i in range(repeats))
    get = statistics.median(timed(lambda i=i: registry.storage.read(f"bench-raw/{i}.bin"))[0]
                            for i in range(repeats))
    # commit of version 1 and load of it, each on a fresh run
    commits, loads = [], []
    for i in range(repeats):
        run = f"fresh-{i}"
        commits.append(timed(lambda: registry.commit(run, shard, base_model=BASE))[0])
        loads.append(timed(lambda: [read_shard(b) for b in registry.read_shards(run, 1)])[0])
    # one run grown to `versions` versions: per-version commit time
    growth = []
    for index in range(versions):
        next_shard = realistic_shard(index)  # built outside the timed region
        growth.append(timed(lambda: registry.commit("growing", next_shard, base_model=BASE))[0])
    window = min(5, versions // 2)
    return {
        "shard_mb": len(shard) / 1e6, "put": put, "get": get,
        "commit": statistics.median(commits), "load": statistics.median(loads),
        "commit_v1": growth[0], "commit_vN": growth[-1],
        "commit_first": statistics.median(growth[:window]), "commit_last": statistics.median(growth[-window:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n, window = args.versions, min(5, args.versions // 2)

    with tempfile.TemporaryDirectory(prefix="registry-bench-") as tmp, SeaweedServer(Path(tmp) / "seaweed") as s3:
        os.environ.update(s3.env())
        s3.create_bucket(BUCKET)
        results = {
            "local": measure(Registry(Path(tmp) / "registry"), n, args.repeats),
            "s3": measure(Registry(f"s3://{BUCKET}/bench"), n, args.repeats),
        }

    print(f"shard: {results['local']['shard_mb']:.1f} MB (32 layers x q,k,v,o, 4096 wide, r=8, bf16); "
          f"medians of {args.repeats}; S3 = SeaweedFS on loopback; {torch.get_num_threads()} CPU threads")
    print(f"{'seconds':36}{'local':>9}{'s3':>9}{'s3/local':>10}")
    rows = [("plain put of the shard bytes", "put"), ("plain get of the shard bytes", "get"),
            ("commit (fresh run, version 1)", "commit"), ("load (fetch + verify + parse)", "load"),
            ("growing run: commit of version 1", "commit_v1"), (f"growing run: commit of version {n}", "commit_vN"),
            (f"growing run: versions 1-{window}, median", "commit_first"),
            (f"growing run: versions {n - window + 1}-{n}, median", "commit_last")]
    for label, key in rows:
        local, s3 = results["local"][key], results["s3"][key]
        print(f"{label:36}{local:>9.3f}{s3:>9.3f}{s3 / local:>10.2f}")
    print("ratios:")
    for backend, r in results.items():
        print(f"  {backend:5}  commit v{n}/v1 = {r['commit_vN'] / r['commit_v1']:.2f}  "
              f"(median of last {window} / first {window} = {r['commit_last'] / r['commit_first']:.2f})  "
              f"commit/plain put = {r['commit'] / r['put']:.2f}  load/plain get = {r['load'] / r['get']:.2f}")


if __name__ == "__main__":
    main()
