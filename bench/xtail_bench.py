"""X-TAIL cost of MoRAM on open_clip vs the plain model, side by side in one run.

    python bench/xtail_bench.py                          # CPU: a small ViT (xtail-bench-vit)
    python bench/xtail_bench.py --model ViT-B-16         # the X-TAIL architecture (default on CUDA)

Both towers carry atoms on q, k, v, out, c_fc, c_proj (r = k = 16). Measured in one process, the
variants taking turns, each at its fastest of --repeats rounds:
  training   images/s of the X-TAIL step (image->text + text->image loss, backward, AdamW) while
             task n trains (n-1 frozen blocks + the open one); the plain model trains all its
             weights (full fine-tuning), the usual alternative to an adapter;
  inference  ms/image of encode_image in eval mode after n tasks (n frozen blocks, δ active).
Ratios are cost ratios (time per image, MoRAM / plain): 1.29 means 29 % slower. The paper
reports 1.06x after 1 task and 1.29x after 10 for inference on ViT-B-16 (GPU).
Weights are random (allow_random_init) and images are random tensors: cost does not depend on
either. Post-pruning is off, so every task keeps all r atoms per layer (the worst case).
The step is the production one: the MoRAM settings and train section of
jobs/configs/xtail/vit-b-16_moram.yaml (engine torch), XTailBenchmark.loss on a batch in its
collate format, and the platform's engine (moram_platform.engine.build_engine); the plain model
takes the same loss, AdamW and schedule calls.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
import warnings

import torch

from pathlib import Path

from moram import get_moram_model
from moram_platform.config import JobConfig, load_config
from moram_platform.engine import _optimizer, build_engine, lr_schedule
from moram_platform.xtail import load_backbone, register_model_config
from moram_platform.xtail.benchmark import XTailBenchmark

CONFIG = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "xtail" / "vit-b-16_moram.yaml"

BENCH_VIT = register_model_config("xtail-bench-vit", {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
})


def parse_args():
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-16" if cuda else BENCH_VIT,
                        help="open_clip architecture (random init)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--batch-size", type=int, default=64 if cuda else 32)
    parser.add_argument("--classes", type=int, default=10, help="class prompts encoded per training step")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (the fastest is reported)")
    parser.add_argument("--steps", type=int, default=3, help="training steps / inference batches per round")
    return parser.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Variant:
    """One model with its training step (engine) and an inference batch."""

    def __init__(self, name: str, model, step):
        self.name, self.model, self.step = name, model, step

    def train_step(self, batch) -> None:
        self.model.train()
        self.step(batch)

    @torch.no_grad()
    def infer(self, images) -> None:
        self.model.eval()
        self.model.encode_image(images)


def engine_step(model, config: JobConfig, loss_fn, steps: int):
    """The platform's training step for a MoRAM model: engine.loss, backward, step."""
    engine = build_engine(model, loss_fn, config.train, 1, steps)

    def step(batch) -> None:
        engine.backward(engine.loss(batch))
        engine.step()
    return step


def plain_step(model, config: JobConfig, loss_fn, steps: int):
    """The same calls for the plain model, every weight trainable (no atoms, no extra loss)."""
    optimizer = _optimizer(list(model.parameters()), config.train)
    schedule = lr_schedule(optimizer, config.train, steps)

    def step(batch) -> None:
        loss_fn(model, batch).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def moram_variant(base, tasks: int, batch, config: JobConfig, loss_fn, steps: int) -> Variant:
    """A MoRAM model with tasks-1 frozen blocks and task ``tasks`` open for training."""
    model = get_moram_model(copy.deepcopy(base), config.moram_config.replace(prune_mass=None))
    for task in range(tasks):
        model.begin_task(f"task-{task}")
        variant = Variant(f"MoRAM, {tasks} task{'s' * (tasks > 1)}", model,
                          engine_step(model, config, loss_fn, steps))
        variant.train_step(batch)  # a block that trained takes part in routing
        if task < tasks - 1:
            model.end_task(prune=False)
    return variant


def interleaved_fastest(variants: list[Variant], action, steps: int, repeats: int, device) -> list[float]:
    """Seconds per call of ``action(variant)`` in its fastest of ``repeats`` rounds, the variants
    taking turns in every round. The fastest round is the one least disturbed by other work on
    a shared machine; taking turns makes slow drifts hit every variant alike."""
    samples = [[] for _ in variants]
    for round_index in range(repeats + 1):
        for variant, times in zip(variants, samples):
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                action(variant)
            sync(device)
            if round_index:  # round 0 warms up
                times.append((time.perf_counter() - start) / steps)
    return [min(times) for times in samples]


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = load_config(CONFIG, ["train.engine=torch"])  # the X-TAIL settings, plain PyTorch engine
    loss_fn = XTailBenchmark().loss
    steps = (args.repeats + 1) * args.steps + len(args.tasks)  # the schedule never runs out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random init is the point here; the warning is expected
        backbone = load_backbone(args.model, allow_random_init=True, device=device)
    size = backbone.model.visual.image_size
    images = torch.randn(args.batch_size, 3, *((size, size) if isinstance(size, int) else size), device=device)
    labels = torch.randint(0, args.classes, (args.batch_size,), device=device)
    tokens = backbone.tokenizer([f"a photo of a class {i}." for i in range(args.classes)]).to(device)
    batch = {"images": images, "labels": labels, "tokens": tokens, "templates_per_class": 1, "num_seen": 0}

    plain_model = copy.deepcopy(backbone.model).requires_grad_(True)
    variants = [Variant("plain open_clip", plain_model, plain_step(plain_model, config, loss_fn, steps))]
    variants += [moram_variant(backbone.model, n, batch, config, loss_fn, steps) for n in args.tasks]
    layers = len(variants[1].model.moram_layers)

    load_before = os.getloadavg()[0]
    train = interleaved_fastest(variants, lambda v: v.train_step(batch), args.steps, args.repeats, device)
    for variant in variants[1:]:
        variant.model.end_task(prune=False)  # task n frozen: inference after n tasks
    infer = interleaved_fastest(variants, lambda v: v.infer(images), args.steps, args.repeats, device)

    print(f"model {args.model} (random init), {layers} MoRAM layers, r=k=16, device {device}, "
          f"batch {args.batch_size}, {args.classes} class prompts/step, torch threads {torch.get_num_threads()}, "
          f"fastest of {args.repeats} rounds x {args.steps}")
    print(f"load average before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print("train: while task n trains (n-1 frozen blocks + 1 open); infer: after task n (n frozen blocks)")
    print(f"{'variant':<22}{'atoms/layer':>12}{'train img/s':>13}{'train cost':>12}{'infer ms/img':>14}{'infer cost':>12}")
    for variant, train_s, infer_s in zip(variants, train, infer):
        atoms = sum(l.num_frozen for l in variant.model.moram_layers.values()) // layers if variant is not variants[0] else 0
        print(f"{variant.name:<22}{atoms:>12}{args.batch_size / train_s:>13.1f}{train_s / train[0]:>11.2f}x"
              f"{1000 * infer_s / args.batch_size:>14.3f}{infer_s / infer[0]:>11.2f}x")


if __name__ == "__main__":
    main()
