"""TRACE's training step three ways, side by side in one process: the vocabulary projection at
every position of the padded batch (Hugging Face's ``model(**batch).loss``), at the answer
positions only (``trace.benchmark.answer_token_loss``), and that loss over the same micro-batch
packed (``trace.pack_training``, what training uses: ``tokenize.pack_for_training``).

    python bench/train_loss_bench.py                    # standard-CL order 1's tasks, micro-batches of 8
    python bench/train_loss_bench.py --tasks yahoo --repeats 7

SmolLM2-135M fp32 with MoRAM as `jobs/configs/standard-cl/smollm2-135m_moram_order1-cpu.yaml`
(q,k, r 8, dropout 0 so both see the same computation), one real micro-batch per task from the
task's shuffled training split. Each repeat times one forward + backward of each candidate, the
order rotated every repeat, after one warm-up turn; the clock is the process's CPU time (on a
shared machine wall time measures the other tenants), with torch on --threads threads. Prints
per task the median seconds of each and two ratios (answer / every, packed / answer) with their
min-max over the repeats.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "jobs/configs/standard-cl/smollm2-135m_moram_order1-cpu.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["dbpedia", "amazon", "yahoo", "agnews"])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared/datasets/TRACE-500"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from moram_platform.benchmark import get_benchmark
    from moram_platform.config import load_config
    from moram_platform.trace.benchmark import answer_token_loss
    from moram_platform.training import build_moram_model, shard_for_worker, World

    padded_config = load_config(CONFIG, [f"data.root={args.data_root}", "moram.dropout=0.0",
                                         "trace.pack_training=false"])
    packed_config = load_config(CONFIG, [f"data.root={args.data_root}", "moram.dropout=0.0", "trace.pack_training=true"])
    benchmark = get_benchmark("trace")
    model, tokenizer = build_moram_model(packed_config, benchmark, [], torch.device("cpu"))
    model.begin_task("bench")
    model.train()
    # name -> (which batch, the loss)
    candidates = {"every position": ("padded", lambda batch: model(**batch).loss),
                  "answer positions": ("padded", lambda batch: answer_token_loss(model, batch)),
                  "packed": ("packed", lambda batch: answer_token_loss(model, batch))}
    print(f"{'task':<10}{'rows':>6}{'packed':>8}{'tokens':>8}{'real':>8}{'scored':>8}"
          + "".join(f"{name + ' s':>20}" for name in candidates) + f"{'answer/every':>14}{'packed/answer':>15}")
    for task in args.tasks:
        examples = shard_for_worker(benchmark.train_examples(padded_config, task), padded_config, 0, 0, World())
        batches = {"padded": benchmark.collate(padded_config, tokenizer, task, examples[:args.micro_batch]),
                   "packed": benchmark.collate(packed_config, tokenizer, task, examples[:args.micro_batch])}
        times: dict[str, list[float]] = {name: [] for name in candidates}
        names = list(candidates)
        for repeat in range(args.repeats + 1):
            for name in names[repeat % 3:] + names[:repeat % 3]:
                which, loss = candidates[name]
                model.zero_grad(set_to_none=True)
                started = time.process_time()
                loss(batches[which]).backward()
                if repeat:  # the first turn warms up
                    times[name].append(time.process_time() - started)

        def ratio(new: str, old: str) -> str:
            values = [b / a for a, b in zip(times[old], times[new])]
            return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

        padded = batches["padded"]
        print(f"{task:<10}{padded['input_ids'].shape[0]:>6}{batches['packed']['input_ids'].shape[0]:>8}"
              f"{padded['input_ids'].numel():>8}{int(padded['attention_mask'].sum()):>8}"
              f"{int((padded['labels'] != -100).sum()):>8}"
              + "".join(f"{statistics.median(times[name]):>20.2f}" for name in candidates)
              + f"{ratio('answer positions', 'every position'):>14}{ratio('packed', 'answer positions'):>15}",
              flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}, {args.threads} threads, CPU seconds per forward + backward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
