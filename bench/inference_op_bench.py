"""MoRAM's inference update per layer: PyTorch eager vs torch.compile (Inductor) vs the C++ op.

    python bench/inference_op_bench.py                 # CPU, fp32, one thread
    python bench/inference_op_bench.py --tokens 1 8 --atoms 56

The update is y + Δy from the base output y [tokens, d_out] and the key responses h
[tokens, R] (routing Eqs. 5-8, the kept atoms' values, the residual), at SmolLM2-135M's width
(d_out = 576), k = 8. Candidates, in rotated order per repeat, after a warm-up (which for
torch.compile includes its compile, timed apart):

    eager     kernels.route_value_reference (the PyTorch path the layer falls back to)
    compiled  torch.compile(route_value_reference) (Inductor's C++ code generation on CPU; topk
              stays an ATen call)
    cpp       kernels.route_value with the C++ op of csrc/route_value.cpp

Microseconds per call (median of --repeats, each a loop of --calls calls), the CPU time of the
one thread, and the ratio to `cpp` with its min-max over the repeats. Prints the load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from moram.kernels import cpu_op, route_value, route_value_reference

K, TAU, DELTA = 8, 0.03, 0.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 1024])
    parser.add_argument("--atoms", type=int, nargs="+", default=[56, 128])
    parser.add_argument("--d-out", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200, help="calls per timed loop (divided by tokens/8)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not cpu_op.available():
        raise SystemExit("the C++ op is not built (make install builds it)")
    compiled = torch.compile(route_value_reference, dynamic=False)
    print(f"CPU, fp32, one thread, d_out {args.d_out}, k {K}, delta {DELTA}; torch {torch.__version__}; "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| tokens | R | eager µs | compiled µs | cpp µs | eager / cpp | compiled / cpp | compile s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for atoms in args.atoms:
        for tokens in args.tokens:
            generator = torch.Generator().manual_seed(tokens + atoms)
            y = torch.randn(tokens, args.d_out, generator=generator)
            h = torch.randn(tokens, atoms, generator=generator)
            values = torch.randn(atoms, args.d_out, generator=generator) * 0.01
            start = time.perf_counter()
            with torch.inference_mode():
                compiled(y, h, values, K, TAU, DELTA)
            compile_s = time.perf_counter() - start
            candidates = {"eager": route_value_reference, "compiled": compiled, "cpp": route_value}
            calls = max(args.calls * 8 // max(tokens, 8), 3)
            samples = {name: [] for name in candidates}
            names = list(candidates)
            with torch.inference_mode():
                for turn in range(args.repeats + 1):
                    shift = turn % len(names)
                    for name in names[shift:] + names[:shift]:
                        fn = candidates[name]
                        begin = time.thread_time()
                        for _ in range(calls):
                            fn(y, h, values, K, TAU, DELTA)
                        if turn:
                            samples[name].append((time.thread_time() - begin) / calls * 1e6)
            med = {name: statistics.median(v) for name, v in samples.items()}

            def ratio(name):
                r = [a / b for a, b in zip(samples[name], samples["cpp"])]
                return f"{statistics.median(r):.2f} [{min(r):.2f}-{max(r):.2f}]"

            print(f"| {tokens} | {atoms} | {med['eager']:.1f} | {med['compiled']:.1f} | {med['cpp']:.1f} | "
                  f"{ratio('eager')} | {ratio('compiled')} | {compile_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
