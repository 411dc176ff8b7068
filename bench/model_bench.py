"""A MoRAM model against PEFT LoRA and the bare base model, side by side in one run.

    python bench/model_bench.py                          # CPU: the real SmolLM2-135M, fp32
    python bench/model_bench.py --batch 1 --seq 128      # a smaller shape on a busy machine
    python bench/model_bench.py --device cuda            # + a 1B LLaMA-shaped random model, bf16

Same trainable rank and targets for both adapters (r = 8 on q/k/v/o, alpha = 16, dropout 0.1).
For every bank size R (atoms per layer: R - 8 frozen plus the 8 of the open task while training;
R frozen at inference) it measures, the candidates taking turns (interleaved) so that machine
noise hits all alike, and reports medians:

    train     one step: forward + backward + AdamW, as a ratio to PEFT LoRA
    saved     bytes autograd keeps for the backward of that step (CPU: the activation memory, a
              load-independent stand-in for peak memory); CUDA: peak allocated memory
    prefill   a forward over the batch under torch.inference_mode (all candidates alike), as a
              ratio to the base model
    decode    greedy generation of --new tokens per sequence after a 32-token prompt, tokens/s

On CPU the clock is the CPU time of the one compute thread (torch.set_num_threads(1)): on a
shared machine wall time measures the other tenants. Needs `peft` (the test extra).
``--json PATH`` also writes the rows (seconds, bytes, tokens/s, the load average) as JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

import moram
from moram import MoRAMConfig, get_moram_model

RANK, ALPHA, DROPOUT = 8, 16, 0.1
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPT = 32


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(candidates: dict, device, clock, repeats: int, warmup: int = 1) -> dict:
    samples = {name: [] for name in candidates}
    for repeat in range(repeats + warmup):
        for name, fn in candidates.items():
            sync(device)
            start = clock()
            fn()
            sync(device)
            if repeat >= warmup:
                samples[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def peft_lora(base):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS)
    return get_peft_model(copy.deepcopy(base), config)


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


def saved_bytes(model, ids, device) -> float:
    """Bytes of activations kept for the backward of one training forward (distinct storages,
    weights excluded); CUDA: peak allocated memory of a whole step."""
    if device.type == "cuda":
        torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
        train_step(model, ids)()
        return torch.cuda.max_memory_allocated()
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


def prefill(model, ids):
    def run():
        with torch.inference_mode():
            model(input_ids=ids)

    return run


def decode(model, prompt, new_tokens):
    def run():
        with torch.inference_mode():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    return run


def bench_model(base, device, clock, atoms_list, batch, seq, new_tokens, repeats):
    vocab = base.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
    prompt = ids[:, :PROMPT]
    base.eval()
    lora = peft_lora(base)
    rows = []
    for atoms in atoms_list:
        trainee = moram_model(base, atoms, training=True).train()
        lora.train()
        train = interleaved_medians({"moram": train_step(trainee, ids), "lora": train_step(lora, ids)},
                                    device, clock, repeats)
        memory = {"moram": saved_bytes(trainee, ids, device), "lora": saved_bytes(lora, ids, device)}
        del trainee
        served = moram_model(base, atoms, training=False).eval()
        lora.eval()
        fwd = interleaved_medians({"base": prefill(base, ids), "moram": prefill(served, ids),
                                   "lora": prefill(lora, ids)}, device, clock, repeats)
        gen = interleaved_medians({"base": decode(base, prompt, new_tokens), "moram": decode(served, prompt, new_tokens),
                                   "lora": decode(lora, prompt, new_tokens)}, device, clock, repeats)
        del served
        tokens = batch * new_tokens
        rows.append((atoms, train, memory, fwd, {name: tokens / t for name, t in gen.items()}))
        print_row(rows[-1], flush=True)
    return rows


def print_header(title):
    print(f"\n{title}\n")
    print("|   R | train MoRAM s | train LoRA s | train/LoRA | saved MoRAM MB | saved LoRA MB |"
          " prefill base s | prefill/base MoRAM | prefill/base LoRA | decode tok/s base | MoRAM | LoRA |")
    print("|----:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def print_row(row, flush=False):
    atoms, train, memory, fwd, gen = row
    mb = 2 ** 20
    print(f"| {atoms:3d} | {train['moram']:.2f} | {train['lora']:.2f} | {train['moram'] / train['lora']:.3f} | "
          f"{memory['moram'] / mb:.0f} | {memory['lora'] / mb:.0f} | {fwd['base']:.2f} | "
          f"{fwd['moram'] / fwd['base']:.3f} | {fwd['lora'] / fwd['base']:.3f} | "
          f"{gen['base']:.1f} | {gen['moram']:.1f} | {gen['lora']:.1f} |", flush=flush)


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
    parser.add_argument("--atoms", type=int, nargs="+", default=[8, 56, 128, 256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new", type=int, default=16, help="decoded tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows here, as JSON")
    parser.add_argument("--model", default="auto", choices=["auto", "smollm2", *LLAMA_SHAPES],
                        help="auto: SmolLM2-135M on CPU (fp32), llama-1b on CUDA (bf16); llama-tiny: a dry run")
    args = parser.parse_args()
    results = {"args": vars(args), "loadavg_start": os.getloadavg(), "runs": []}
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())

    if args.model in LLAMA_SHAPES:  # one llama-shaped model on the one device asked for
        device = torch.device("cuda" if want_cuda else "cpu")
        dtype = torch.bfloat16 if want_cuda else torch.float32
        if device.type == "cpu":
            torch.set_num_threads(1)
        clock = time.perf_counter if want_cuda else time.thread_time
        print_header(f"{args.model} (random), {device.type}, {dtype}, batch {args.batch}x{args.seq}")
        rows = bench_model(llama_shaped(args.model, device, dtype), device, clock, args.atoms, args.batch, args.seq,
                           args.new, args.repeats)
        results["runs"].append(as_json(args.model, device.type, str(dtype), "wall s" if want_cuda else "thread CPU s",
                                       rows))
        want_cuda = False
    elif args.device != "cuda" and args.model in ("auto", "smollm2"):
        torch.set_num_threads(1)  # all the work in the timed thread
        base, _ = moram.load_causal_lm(moram.smollm2_path(), dtype=torch.float32)
        print_header(f"SmolLM2-135M, CPU, fp32, batch {args.batch}x{args.seq}, decode batch {args.batch}: "
                     "seconds are CPU time of one thread")
        rows = bench_model(base, torch.device("cpu"), time.thread_time, args.atoms, args.batch, args.seq, args.new,
                           args.repeats)
        results["runs"].append(as_json("SmolLM2-135M", "cpu", "float32", "thread CPU s", rows))
        del base
    if want_cuda:
        device = torch.device("cuda")
        print_header(f"1B LLaMA-shaped random model, CUDA, bf16, batch {args.batch}x{args.seq}: wall seconds")
        rows = bench_model(llama_shaped("llama-1b", device), device, time.perf_counter, args.atoms, args.batch,
                           args.seq, args.new, args.repeats)
        results["runs"].append(as_json("1B LLaMA-shaped random", torch.cuda.get_device_name(), "bfloat16", "wall s",
                                       rows))
    results["loadavg_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


def as_json(model: str, device: str, dtype: str, clock: str, rows) -> dict:
    keys = ("atoms", "train_s", "saved_bytes", "prefill_s", "decode_tokens_per_s")
    return {"model": model, "device": device, "dtype": dtype, "clock": clock,
            "rows": [dict(zip(keys, row)) for row in rows]}


if __name__ == "__main__":
    main()
