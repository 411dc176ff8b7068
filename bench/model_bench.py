"""A MoRAM model against PEFT LoRA and the bare base model, side by side in one process.

    python bench/model_bench.py                          # CPU: the real SmolLM2-135M, fp32, R = 56 128
    python bench/model_bench.py --stages decode --decode-batches 1 8
    python bench/model_bench.py --device cuda            # a 1B LLaMA-shaped random model, bf16

Same trainable rank and targets for both adapters (r = 8 on q/k/v/o, alpha = 16, dropout 0.1).
For every bank size R (atoms per layer: R - 8 frozen plus the 8 of the open task while training;
R frozen at inference) and stage, the candidates run in turns, the order rotated every repeat
(so neither load drift nor cache warmth favours one), after one warm-up turn:

    train     one step (forward + backward + AdamW) at --batch x --seq: MoRAM vs PEFT LoRA (on CPU
              also "moram composed": MoRAM's training without the fused update, its before)
    prefill   a forward over --batch x --seq under torch.inference_mode: base, MoRAM, LoRA
              unmerged, LoRA merged (merge_and_unload: the base's cost, a check of the clock)
    decode    per generated token, as tokens/s vs the base: a --prompt-token prompt is prefilled
              (untimed), then --new greedy steps with the KV cache are timed and divided by
              --new; at each batch of --decode-batches; the same candidates as prefill

A ratio is taken within each repeat (against the reference's time of the same turn) and the table
prints its median and, in brackets, its min-max over the repeats: the spread is the noise.
Memory, per candidate: CPU: the bytes of its adapter (distinct storages beyond the base model's;
capacity slack included) and, for train, the activation bytes autograd keeps for the backward;
CUDA: the peak allocated during its own run above what was allocated before it, plus its adapter.
On CPU the clock is the CPU time of the one compute thread (torch.set_num_threads(1)): on a
shared machine wall time measures the other tenants. The load average is printed with each
table. On CUDA PEFT runs as a user runs it: get_peft_model's default autocast_adapter_dtype=True
(adapter weights in fp32 over the bf16 base). Needs `peft` (the test extra). ``--json PATH``
writes every sample too.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import statistics
import time

import torch

import moram
from moram import MoRAMConfig, get_moram_model

RANK, ALPHA, DROPOUT = 8, 16, 0.1
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rotated_samples(candidates: dict, device, clock, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each candidate, ``repeats`` turns in rotated order. A candidate that
    returns a number reports its own time (decode: the steps after the untimed prefill)."""
    names = list(candidates)
    samples = {name: [] for name in names}
    for turn in range(warmup + repeats):
        shift = turn % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            start = clock()
            own = candidates[name]()
            sync(device)
            if turn >= warmup:
                samples[name].append(own if own is not None else clock() - start)
    return samples


def ratio_summary(samples: dict[str, list[float]], reference: str, speed: bool = False) -> dict[str, dict]:
    """Median seconds, and the per-turn ratio to the reference (time / reference time; with
    ``speed``, reference time / time: tokens/s as a share of the reference's): median, min, max."""
    out = {}
    for name, values in samples.items():
        ratios = [(r / v if speed else v / r) for v, r in zip(values, samples[reference])]
        out[name] = {"median_s": statistics.median(values), "ratio": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios), "samples_s": values}
    return out


def peft_lora(base):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS)
    return get_peft_model(copy.deepcopy(base), config)  # autocast_adapter_dtype=True: the default


def lora_merged(base):
    lora = peft_lora(base)
    for name, parameter in lora.named_parameters():  # a trained-looking B, so the merge does work
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.01)
    return lora.merge_and_unload().eval()


def moram_model(base, atoms: int, training: bool):
    """A MoRAM model whose every layer holds `atoms` atoms: frozen random ones (as earlier tasks
    leave them), plus, for training, the open task's r trainable atoms among them."""
    config = MoRAMConfig(r=RANK, k=8, alpha=ALPHA, dropout=DROPOUT, target_modules=TARGETS)
    model = get_moram_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(0)
    frozen = atoms - RANK if training else atoms
    for layer in model.moram_layers.values():
        kw = dict(device=layer.weight.device, dtype=layer.bank_keys.dtype)
        A = torch.randn(frozen, layer.in_features, generator=generator) / layer.in_features ** 0.5
        B = torch.randn(layer.out_features, frozen, generator=generator) * 0.01
        layer.append_frozen(A.to(**kw), B.to(**kw))
    if training:
        model.begin_task("bench")
        for layer in model.moram_layers.values():
            layer.current_trained = True
    return model


def train_step(model, ids):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def composed_training(step):
    """The same step through MoRAM's composed training path (MORAM_FUSED_TRAINING=0): the fused
    training update's before (issue 25.3)."""
    def run():
        previous = os.environ.get("MORAM_FUSED_TRAINING")
        os.environ["MORAM_FUSED_TRAINING"] = "0"
        try:
            step()
        finally:
            if previous is None:
                del os.environ["MORAM_FUSED_TRAINING"]
            else:
                os.environ["MORAM_FUSED_TRAINING"] = previous
    return run


def saved_bytes(model, ids) -> int:
    """Bytes of activations kept for the backward of one training forward (distinct storages,
    weights excluded): a load-independent stand-in for the activation memory on CPU."""
    storages = {}
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:  # activations only: the weights exist anyway
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def _storages(module) -> dict[int, int]:
    tensors = [*module.parameters(), *module.buffers()]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def adapter_bytes(model, base) -> int:
    """Bytes of the candidate's weights beyond the base model's: distinct storages of its
    parameters and buffers minus the base's (a storage shared with the base weights counts
    only its extra rows)."""
    return max(sum(_storages(model).values()) - sum(_storages(base).values()), 0)


def cuda_peak(fn, model, base) -> int:
    """Peak allocated during one run of ``fn`` above what was allocated before it (the other
    resident models), plus the candidate's adapter weights."""
    torch.cuda.synchronize(), torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before + adapter_bytes(model, base)


def prefill(model, ids):
    def run():
        with torch.inference_mode():
            model(input_ids=ids)

    return run


# transformers >= 5.2x names the KV cache argument `cache` (past_key_values: deprecated)
CACHE_KEYWORD = "cache" if "cache" in inspect.signature(
    __import__("transformers").LlamaForCausalLM.forward).parameters else "past_key_values"


def _cache_of(out):
    return getattr(out, "cache", None) or out.past_key_values


def decode_per_token(model, prompt, new_tokens, device, clock):
    """Seconds per greedy step with the KV cache; the prompt's prefill is run but not timed."""
    def run():
        with torch.inference_mode():
            out = model(input_ids=prompt, use_cache=True)
            cache, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
            sync(device)
            start = clock()
            for _ in range(new_tokens):
                out = model(input_ids=token, **{CACHE_KEYWORD: cache}, use_cache=True)
                cache, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
            sync(device)
            return (clock() - start) / new_tokens

    return run


def bench_model(base, device, clock, args) -> list[dict]:
    vocab = base.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)
    base.eval()
    tables = []

    def table(stage, atoms, candidates, reference, memory, extra=""):
        samples = rotated_samples(candidates, device, clock, args.repeats)
        row = {"stage": stage, "atoms": atoms, "shape": extra, "loadavg": os.getloadavg(),
               "reference": reference, "ratio": "tokens/s share" if stage == "decode" else "time",
               "candidates": ratio_summary(samples, reference, speed=stage == "decode"), "memory_bytes": memory}
        print_table(row)
        tables.append(row)

    for atoms in args.atoms:
        if "train" in args.stages:
            trainee, lora = moram_model(base, atoms, training=True).train(), peft_lora(base).train()
            memory = {"moram": saved_bytes(trainee, ids), "lora": saved_bytes(lora, ids)}
            if device.type == "cuda":
                memory = {"moram": cuda_peak(train_step(trainee, ids), trainee, base),
                          "lora": cuda_peak(train_step(lora, ids), lora, base)}
            candidates = {"moram": train_step(trainee, ids), "lora": train_step(lora, ids)}
            if device.type == "cpu":  # where the fused training update runs: its composed before
                composed = moram_model(base, atoms, training=True).train()
                candidates["moram composed"] = composed_training(train_step(composed, ids))
                composed_bytes = []
                composed_training(lambda: composed_bytes.append(saved_bytes(composed, ids)))()
                memory["moram composed"] = composed_bytes[0]
            table("train", atoms, candidates, "lora", memory, f"{args.batch}x{args.seq}")
            del trainee, lora, candidates
        if not {"prefill", "decode"} & set(args.stages):
            continue
        served = {"base": base, "moram": moram_model(base, atoms, training=False).eval(),
                  "lora": peft_lora(base).eval(), "lora merged": lora_merged(base)}
        memory = {name: adapter_bytes(model, base) for name, model in served.items()}
        if "prefill" in args.stages:
            runs = {name: prefill(model, ids) for name, model in served.items()}
            if device.type == "cuda":
                memory = {name: cuda_peak(runs[name], model, base) for name, model in served.items()}
            table("prefill", atoms, runs, "base", memory, f"{args.batch}x{args.seq}")
        if "decode" in args.stages:
            for batch in args.decode_batches:
                prompt = torch.randint(0, vocab, (batch, args.prompt), generator=generator).to(device)
                runs = {name: decode_per_token(model, prompt, args.new, device, clock)
                        for name, model in served.items()}
                table("decode", atoms, runs, "base", memory,
                      f"batch {batch}, {args.prompt}-token prompt, {args.new} steps")
        del served
    return tables


def print_table(row):
    mb = 2 ** 20
    memory_name = "saved MB" if row["stage"] == "train" else "adapter MB"
    load = ", ".join(f"{x:.2f}" for x in row["loadavg"])
    ratio = "tokens/s vs" if row["stage"] == "decode" else "time vs"
    print(f"\n{row['stage']}, R = {row['atoms']}, {row['shape']} (load average {load}; "
          f"{ratio} {row['reference']}: median [min-max] over the repeats)\n")
    seconds = "median s/token" if row["stage"] == "decode" else "median s"
    print(f"| candidate | {seconds} | {ratio} {row['reference']} | {memory_name} |")
    print("|---|---:|---:|---:|")
    for name, c in row["candidates"].items():
        memory = row["memory_bytes"].get(name)
        print(f"| {name} | {c['median_s']:.4f} | {c['ratio']:.3f} [{c['ratio_min']:.3f}-{c['ratio_max']:.3f}] | "
              f"{'' if memory is None else f'{memory / mb:.1f}'} |", flush=True)


LLAMA_SHAPES = {  # random weights in a shape (not a model): speed and memory do not depend on the weights
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8),   # Llama-3.2-1B
    "llama-tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2),  # a dry run of the script
}


def llama_shaped(shape: str, device, dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA_SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--atoms", type=int, nargs="+", default=[56, 128])
    parser.add_argument("--stages", nargs="+", default=["train", "prefill", "decode"],
                        choices=["train", "prefill", "decode"])
    parser.add_argument("--batch", type=int, default=4, help="train and prefill batch")
    parser.add_argument("--seq", type=int, default=256, help="train and prefill tokens per sequence")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--prompt", type=int, default=32, help="decode prompt tokens (prefilled, untimed)")
    parser.add_argument("--new", type=int, default=16, help="timed decode steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the tables (every sample, the load average) as JSON")
    parser.add_argument("--model", default="auto", choices=["auto", "smollm2", *LLAMA_SHAPES],
                        help="auto: SmolLM2-135M on CPU (fp32), llama-1b on CUDA (bf16); llama-tiny: a dry run")
    args = parser.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)  # all the work in the timed thread
    clock = time.perf_counter if cuda else time.thread_time
    name = args.model if args.model != "auto" else ("llama-1b" if cuda else "smollm2")
    if name == "smollm2":
        base, _ = moram.load_causal_lm(moram.smollm2_path(), dtype=torch.float32)
        title, dtype = "SmolLM2-135M", "float32"
    else:
        dtype = "bfloat16" if cuda else "float32"
        base, title = llama_shaped(name, device, getattr(torch, dtype)), f"{name} (random weights)"
    where = torch.cuda.get_device_name() if cuda else "CPU, one thread, thread CPU time"
    print(f"{title}, {where}, {dtype}, torch {torch.__version__}, moram from {os.path.dirname(moram.__file__)}")
    tables = bench_model(base, device, clock, args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": title, "device": where, "dtype": dtype, "args": vars(args), "tables": tables},
                      handle, indent=1)


if __name__ == "__main__":
    main()
