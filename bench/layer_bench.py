"""MoRAM layer cost vs the same base linear and a dense rank-16 LoRA, side by side in one run.

    python bench/layer_bench.py                 # CPU, and CUDA when present
    python bench/layer_bench.py --tokens 2048 --device cuda

For d in {768, 4096}, k = 16 and R in {16, 64, 128, 256} accumulated atoms (the last 16 trainable,
the rest frozen, as in a task after R/16 - 1 earlier ones), prints forward and forward+backward
time as ratios to the base linear and to LoRA-16.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from moram import MoRAMConfig
from moram.layer import MoRAMLayer


class DenseLoRA(nn.Module):
    def __init__(self, base: nn.Linear, r: int):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(r, base.in_features, device=base.weight.device, dtype=base.weight.dtype) * 0.01)
        self.B = nn.Parameter(torch.randn(base.out_features, r, device=base.weight.device, dtype=base.weight.dtype) * 0.01)

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t() * 2.0


def moram_layer(base: nn.Linear, atoms: int, k: int) -> MoRAMLayer:
    config = MoRAMConfig(r=16, k=k, tau=0.03, dropout=0.0, target_modules=["x"])
    layer = MoRAMLayer(base, config, name="bench")
    frozen = atoms - 16
    layer.append_frozen(torch.randn(frozen, base.in_features) * 0.02, torch.randn(base.out_features, frozen) * 0.02)
    layer.begin_task(frozen // 16)
    with torch.no_grad():
        layer.B.normal_(std=0.02)
    return layer.train()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(modules: dict, x, device, repeats) -> dict:
    """Median seconds of forward and forward+backward per module, the modules taking turns
    in every repeat so that machine noise hits all of them alike."""
    def forward(module):
        with torch.no_grad():
            module(x)

    def forward_backward(module):
        module(x).sum().backward()

    samples = {(name, kind): [] for name in modules for kind in ("f", "fb")}
    for repeat in range(repeats + 2):  # the first two rounds warm up
        for name, module in modules.items():
            for kind, fn in (("f", forward), ("fb", forward_backward)):
                sync(device)
                start = time.perf_counter()
                fn(module)
                sync(device)
                if repeat >= 2:
                    samples[(name, kind)].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in samples.items()}


def run(device: torch.device, dtype: torch.dtype, tokens: int, repeats: int) -> None:
    print(f"\n## device={device.type} dtype={str(dtype).split('.')[-1]} tokens={tokens} k=16 (ratios; lower is better)")
    print(f"{'d':>5} {'R':>4} | {'fwd/base':>9} {'fwd/LoRA16':>10} | {'f+b/base':>9} {'f+b/LoRA16':>10} | {'base fwd ms':>11}")
    for d in (768, 4096):
        torch.manual_seed(0)
        base = nn.Linear(d, d).to(device=device, dtype=dtype).requires_grad_(False)
        x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
        lora = DenseLoRA(base, 16)
        for atoms in (16, 64, 128, 256):
            layer = moram_layer(base, atoms, k=16).to(device=device, dtype=dtype)
            t = interleaved_medians({"base": base, "lora": lora, "moram": layer}, x, device, repeats)
            print(f"{d:>5} {atoms:>4} | {t['moram', 'f'] / t['base', 'f']:>9.2f} {t['moram', 'f'] / t['lora', 'f']:>10.2f} | "
                  f"{t['moram', 'fb'] / t['base', 'fb']:>9.2f} {t['moram', 'fb'] / t['lora', 'fb']:>10.2f} | "
                  f"{t['base', 'f'] * 1e3:>11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per call (default: 512 CPU, 8192 CUDA)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    for name in devices:
        if name == "cuda" and not torch.cuda.is_available():
            print("\n(no CUDA device: GPU rows skipped)")
            continue
        device = torch.device(name)
        tokens = args.tokens or (512 if name == "cpu" else 8192)
        repeats = args.repeats or (5 if name == "cpu" else 50)
        dtypes = [torch.float32] if name == "cpu" else [torch.float32, torch.bfloat16]
        for dtype in dtypes:
            run(device, dtype, tokens, repeats)


if __name__ == "__main__":
    main()
