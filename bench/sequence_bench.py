"""Whole sequences, the behaviour before the throughput work and after, side by side on one machine.

    python bench/sequence_bench.py                         # the quickstart config and the 4-task standard-CL one
    python bench/sequence_bench.py --only quickstart --variants before after
    python bench/sequence_bench.py --only standard-cl --variants before final seen full

Variants (each a fresh run in its own output folder, one after the other, in this process's Ray):
    before  eval.evaluator task (a fresh Ray task and model load per evaluated version), plain
            left padding, eval.schedule full: what the platform did before
    after   the evaluator actor, shared prompt prefixes, the config's own schedule (full for both
            configs here: the README's quickstart matrix)
    full | seen | final   `after` with that eval.schedule
It prints, per config and variant, the wall time and where it went (bench phases: start = Ray,
MLflow, the run actor; train = the Ray Train fits, of which train steps = the chief's own
train_task: model load, engine, steps, statistics; the rest of a fit is the worker group's start,
the checkpoint and the commit report; evaluate; log = MLflow), the ratio to `before`, and whether
the matrix is the same cell by cell where both have the cell. Time it alone on the machine and
note the load average: a second job on two cores inflates every phase.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    # The README's quickstart, as `make quickstart` runs it.
    "quickstart": (ROOT / "jobs/configs/trace/smollm2-135m_moram_quickstart.yaml", []),
    # Issue 21's 4-task standard-CL sequence: 128 train / 48 test examples per task, SmolLM2 fp32.
    "standard-cl": (ROOT / "jobs/configs/standard-cl/smollm2-135m_moram_order1-cpu.yaml",
                    ["data.max_train_examples=128", "data.max_eval_examples=48", "train.global_batch_size=16",
                     "eval.max_new_tokens=8"]),
}
VARIANTS = {
    "before": ["eval.evaluator=task", "eval.share_prefix=false", "eval.schedule=full"],
    "after": [],
    "full": ["eval.schedule=full"],
    "seen": ["eval.schedule=seen"],
    "final": ["eval.schedule=final"],
}


def run(name: str, variant: str, out: Path, data_root: str) -> dict:
    from moram_platform.config import load_config
    from moram_platform.sequence import run_sequence

    path, overrides = CONFIGS[name]
    folder = out / f"{name}-{variant}"
    config = load_config(path, [f"data.root={data_root}", f"run.output_dir={folder}",
                                f"run.name=bench-{name}-{variant}-{int(time.time())}", *overrides, *VARIANTS[variant]])
    started = time.perf_counter()
    result = run_sequence(config, progress=False)
    wall = time.perf_counter() - started
    phases = {phase: round(sum(values), 1) for phase, values in result.timings.items()}
    return {"config": name, "variant": variant, "wall_s": round(wall, 1), "phases": phases,
            "matrix": result.matrix, "baseline": result.baseline, "summary": result.summary,
            "load_average": os.getloadavg()}


def same_cells(a: dict, b: dict) -> bool:
    return all(x == y for ra, rb in zip(a["matrix"], b["matrix"]) for x, y in zip(ra, rb)
               if x is not None and y is not None)


def table(results: list[dict]) -> str:
    phases = ["start", "train", "train_steps", "evaluate", "log"]
    lines = [f"{'config':<12}{'variant':<8}{'wall s':>8}{'vs before':>10}" + "".join(f"{p:>12}" for p in phases)
             + f"{'same cells':>12}{'load':>7}"]
    before = {r["config"]: r for r in results if r["variant"] == "before"}
    for r in results:
        ref = before.get(r["config"])
        ratio = f"{r['wall_s'] / ref['wall_s']:.2f}" if ref else "-"
        same = ("yes" if same_cells(r, ref) else "NO") if ref and r is not ref else "-"
        lines.append(f"{r['config']:<12}{r['variant']:<8}{r['wall_s']:>8.1f}{ratio:>10}"
                     + "".join(f"{r['phases'].get(p, 0.0):>12.1f}" for p in phases)
                     + f"{same:>12}{r['load_average'][0]:>7.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=list(CONFIGS), action="append", help="configs to run (default: all)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["before", "after", "final"])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared/datasets/TRACE-500"))
    parser.add_argument("--out", type=Path, default=Path("bench-sequence-out"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    for name in args.only or list(CONFIGS):
        for variant in args.variants:
            results.append(run(name, variant, args.out.resolve(), args.data_root))
            print(table(results), flush=True)
            if args.json:  # after every run: a crash or a stop late in the bench keeps what was measured
                args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
