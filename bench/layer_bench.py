"""MoRAM layer cost vs the same base linear and a dense rank-16 LoRA, side by side in one run.

    python bench/layer_bench.py                       # CPU, and CUDA when present
    python bench/layer_bench.py --device cuda --tokens 8192
    python bench/layer_bench.py --section value       # only the dense/sparse value switch point

Section "layer": for d in {768, 2048}, k = 16 and R in {16, 56, 128, 256} accumulated atoms (the
last 16 trainable, the rest frozen, as in a task after earlier ones), the forward (no grad) and
forward+backward time of every MoRAM path as ratios to the base linear and to LoRA-16:

    layer   moram.MoRAMLayer as it is (torch.cat of the bank, functional.route, dense value)
    ref     the equations: h = x·Aᵀ, w = functional.route(h), Δy = (w ⊙ h)·Bᵀ
    fused   Δy = fused_route_mix(h)·Bᵀ (the Triton kernel on CUDA; on CPU it is `ref`: skipped)
    sparse  coef, idx = fused_route_topk(h); Δy = sparse_value(coef, idx, frozen B, current B):
            the frozen values stored as rows, the trainable block apart, no cat of B (dense below
            the default threshold SPARSE_MIN_ATOMS_PER_K · k)
    split   sparse, and the keys apart as well: h = [x·A_frozenᵀ, x·A_currentᵀ], so the backward
            builds no gradient for the frozen keys (what the layer integration can reach)

Section "value": Δy from the kept coefficients alone, dense (scatter + GEMM) against sparse
(embedding_bag), for a finer sweep of R: where sparse starts to win is the default threshold.
All timings are medians over repeats in which the candidates take turns (interleaved), so that
machine noise hits all of them alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from moram import MoRAMConfig
from moram import functional as MF
from moram.kernels import dense_value, fused_route_mix, fused_route_topk, sparse_value

TRAINABLE = 16   # atoms of the current task's block
K = 16
TAU = 0.03


class DenseLoRA(nn.Module):
    def __init__(self, base: nn.Linear, r: int):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(r, base.in_features, device=base.weight.device, dtype=base.weight.dtype) * 0.01)
        self.B = nn.Parameter(torch.randn(base.out_features, r, device=base.weight.device, dtype=base.weight.dtype) * 0.01)

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t() * 2.0


class MoRAMPath(nn.Module):
    """A frozen bank plus a trainable block over a base linear, with one routing/value path."""

    def __init__(self, base: nn.Linear, atoms: int, path: str):
        super().__init__()
        self.base, self.path = base, path
        frozen, kw = atoms - TRAINABLE, dict(device=base.weight.device, dtype=base.weight.dtype)
        self.register_buffer("frozen_A", torch.randn(frozen, base.in_features, **kw) * 0.02)
        # values stored as rows [R, d_out] (what sparse_value reads without a copy); B = rows.t()
        self.register_buffer("frozen_rows", torch.randn(frozen, base.out_features, **kw) * 0.02)
        self.A = nn.Parameter(torch.randn(TRAINABLE, base.in_features, **kw) * 0.02)
        self.B = nn.Parameter(torch.randn(base.out_features, TRAINABLE, **kw) * 0.02)

    def forward(self, x):
        if self.path == "split":  # keys apart too: no gradient product for the frozen keys
            h = torch.cat([x @ self.frozen_A.t(), x @ self.A.t()], dim=-1)
        else:
            h = x @ torch.cat([self.frozen_A, self.A]).t()                  # Eq. 3
        if self.path in ("sparse", "split"):  # the frozen bank and the trainable block apart: no cat of B
            delta = sparse_value(*fused_route_topk(h, K, TAU), self.frozen_rows.t(), self.B * 2.0)
            return self.base(x) + delta
        B = torch.cat([self.frozen_rows.t(), self.B * 2.0], dim=1)
        mixed = MF.route(h, K, TAU) * h if self.path == "ref" else fused_route_mix(h, K, TAU)
        return self.base(x) + mixed @ B.t()


def moram_layer(base: nn.Linear, atoms: int) -> nn.Module:
    """The layer as the package builds it (its API may move: then the row is skipped)."""
    from moram.layer import MoRAMLayer

    config = MoRAMConfig(r=TRAINABLE, k=K, tau=TAU, dropout=0.0, target_modules=["x"])
    layer = MoRAMLayer(base, config, name="bench")
    frozen = atoms - TRAINABLE
    kw = dict(device=base.weight.device, dtype=base.weight.dtype)
    layer.append_frozen(torch.randn(frozen, base.in_features, **kw) * 0.02,
                        torch.randn(base.out_features, frozen, **kw) * 0.02)
    layer.begin_task(frozen // TRAINABLE)
    with torch.no_grad():
        layer.B.normal_(std=0.02)
    return layer.train()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# On a shared CPU, wall time mostly measures the other tenants; the CPU time of the (single)
# compute thread measures the work. CUDA: wall time around synchronisations.
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
clock = time.perf_counter


def interleaved_medians(candidates: dict, device, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per (name, kind) for callables candidates[name][kind](), taking turns."""
    samples = {(name, kind): [] for name, kinds in candidates.items() for kind in kinds}
    for repeat in range(repeats + warmup):
        for name, kinds in candidates.items():
            for kind, fn in kinds.items():
                sync(device)
                start = clock()
                fn()
                sync(device)
                if repeat >= warmup:
                    samples[(name, kind)].append(clock() - start)
    return {key: statistics.median(values) for key, values in samples.items()}


def module_timings(module, x, grad_out):
    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        module(x).backward(grad_out)

    return {"f": forward, "fb": forward_backward}


def layer_section(device, dtype, tokens, repeats, dims, banks):
    print(f"\n## layer: device={device.type} dtype={str(dtype).split('.')[-1]} tokens={tokens} k={K} "
          f"threads={torch.get_num_threads()} (ratios; lower is better)")
    print(f"{'d':>5} {'R':>4} {'path':>6} | {'fwd/base':>9} {'fwd/LoRA16':>10} | {'f+b/base':>9} {'f+b/LoRA16':>10} | "
          f"{'fwd ms':>7} {'f+b ms':>7}")
    paths = ["layer", "ref", "sparse", "split"] + (["fused"] if device.type == "cuda" else [])
    for d in dims:
        torch.manual_seed(0)
        base = nn.Linear(d, d).to(device=device, dtype=dtype).requires_grad_(False)
        x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
        lora = DenseLoRA(base, 16)
        grad_out = torch.randn(tokens, d, device=device, dtype=dtype)
        for atoms in banks:
            modules = {"base": base, "lora": lora}
            for path in paths:
                try:
                    modules[path] = moram_layer(base, atoms) if path == "layer" else MoRAMPath(base, atoms, path)
                except Exception as error:  # noqa: BLE001 - a bench row, not a test
                    print(f"({path} skipped: {type(error).__name__}: {error})")
            timings = {name: module_timings(m, x, grad_out) for name, m in modules.items()}
            t = interleaved_medians(timings, device, repeats)
            for path in [p for p in paths if p in modules]:
                print(f"{d:>5} {atoms:>4} {path:>6} | {t[path, 'f'] / t['base', 'f']:>9.2f} "
                      f"{t[path, 'f'] / t['lora', 'f']:>10.2f} | {t[path, 'fb'] / t['base', 'fb']:>9.2f} "
                      f"{t[path, 'fb'] / t['lora', 'fb']:>10.2f} | "
                      f"{t[path, 'f'] * 1e3:>7.1f} {t[path, 'fb'] * 1e3:>7.1f}")
            print(f"{d:>5} {atoms:>4} {'(base':>6} | fwd {t['base', 'f'] * 1e3:.1f} ms, "
                  f"f+b {t['base', 'fb'] * 1e3:.1f} ms; "
                  f"LoRA16 fwd {t['lora', 'f'] * 1e3:.1f} ms, f+b {t['lora', 'fb'] * 1e3:.1f} ms)")


def value_section(device, dtype, tokens, repeats, dims, banks):
    print(f"\n## value: Δy from {K} kept atoms per token, the last {TRAINABLE} atoms trainable; sparse "
          f"(embedding_bag over the frozen rows + dense trainable block) / dense (cat of the bank, as the "
          f"layer does, scatter + GEMM); device={device.type} dtype={str(dtype).split('.')[-1]} "
          f"tokens={tokens} (< 1: sparse wins)")
    print(f"{'d':>5} {'R':>4} | {'fwd':>6} {'f+b':>6} | {'dense fwd ms':>12} {'f+b ms':>7}")
    for d in dims:
        for atoms in banks:
            torch.manual_seed(0)
            kw = dict(device=device, dtype=dtype)
            frozen_rows = torch.randn(atoms - TRAINABLE, d, **kw) * 0.02   # stored as rows
            current_B = (torch.randn(d, TRAINABLE, **kw) * 0.02).requires_grad_()
            coef = torch.randn(tokens, K, **kw, requires_grad=True)
            idx = torch.rand(tokens, atoms, device=device).argsort(-1)[:, :K].sort(-1).values
            grad_out = torch.randn(tokens, d, **kw)
            runs = {
                "dense": lambda: dense_value(coef, idx, torch.cat([frozen_rows.t(), current_B], dim=1)),
                "sparse": lambda: sparse_value(coef, idx, frozen_rows.t(), current_B, min_atoms_per_k=0),
            }
            candidates = {}
            for name, fn in runs.items():
                def forward(fn=fn):
                    with torch.no_grad():
                        fn()

                candidates[name] = {"f": forward, "fb": lambda fn=fn: fn().backward(grad_out)}
            t = interleaved_medians(candidates, device, repeats)
            print(f"{d:>5} {atoms:>4} | {t['sparse', 'f'] / t['dense', 'f']:>6.2f} "
                  f"{t['sparse', 'fb'] / t['dense', 'fb']:>6.2f} | "
                  f"{t['dense', 'f'] * 1e3:>12.2f} {t['dense', 'fb'] * 1e3:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--section", choices=["layer", "value", "all"], default="all")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per call (default: 512 CPU, 8192 CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 5 CPU, 50 CUDA)")
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 2048])
    parser.add_argument("--banks", type=int, nargs="+", default=[16, 56, 128, 256], help="R, atoms in the bank")
    parser.add_argument("--value-banks", type=int, nargs="+", default=[16, 32, 48, 64, 96, 128, 256])
    parser.add_argument("--clock", choices=["auto", *CLOCKS], default="auto",
                        help="auto: CPU time of one compute thread on CPU (torch.set_num_threads(1)), wall on CUDA")
    args = parser.parse_args()
    if any(r < TRAINABLE for r in args.banks + args.value_banks):
        parser.error(f"--banks/--value-banks: every R must be >= {TRAINABLE} (the trainable block)")
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    for name in devices:
        if name == "cuda" and not torch.cuda.is_available():
            print("\n(no CUDA device: GPU rows skipped)")
            continue
        device = torch.device(name)
        global clock
        clock_name = args.clock if args.clock != "auto" else ("thread" if name == "cpu" else "wall")
        clock = CLOCKS[clock_name]
        if clock_name == "thread":
            torch.set_num_threads(1)  # all the work in the timed thread
        print(f"\n# {name}: clock={clock_name}, torch threads={torch.get_num_threads()}")
        tokens = args.tokens or (512 if name == "cpu" else 8192)
        repeats = args.repeats or (5 if name == "cpu" else 50)
        dtypes = [torch.float32] if name == "cpu" else [torch.float32, torch.bfloat16]
        for dtype in dtypes:
            if args.section in ("value", "all"):
                value_section(device, dtype, tokens, repeats, args.dims, args.value_banks)
            if args.section in ("layer", "all"):
                layer_section(device, dtype, tokens, repeats, args.dims, args.banks)


if __name__ == "__main__":
    main()
