"""Behaviour on the real SmolLM2-135M and real TRACE-500 data: two tasks in sequence."""
import json

import pytest
import torch

from moram import MoRAMConfig, get_moram_model, load_causal_lm

pytestmark = pytest.mark.slow
EXAMPLES, MAX_LEN, BATCH, STEPS = 24, 160, 4, 10


def task_batches(trace_root, task, tokenizer):
    rows = json.loads((trace_root / task / "train.json").read_text())[:EXAMPLES]
    batches = []
    for start in range(0, len(rows), BATCH):
        ids, labels = [], []
        for row in rows[start:start + BATCH]:
            prompt = tokenizer(row["prompt"], add_special_tokens=False).input_ids
            answer = tokenizer(row["answer"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            prompt = prompt[-(MAX_LEN - len(answer)):]  # keep the prompt's end
            ids.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)  # loss on answer tokens only
        width = max(map(len, ids))  # right padding in training
        batches.append({
            "input_ids": torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
        })
    return batches


@torch.no_grad()
def mean_loss(model, batches):
    model.eval()
    return sum(model(**b).loss.item() for b in batches) / len(batches)


def train(model, batches):
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3, betas=(0.9, 0.95))
    for step in range(STEPS):
        model(**batches[step % len(batches)]).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step(), optimizer.zero_grad()


def test_two_trace_tasks_learn_and_task_one_atoms_survive(smollm2_model_dir, trace_root):
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(smollm2_model_dir)
    model = get_moram_model(model, MoRAMConfig(r=8, k=8, tau=0.03, delta=0.2))
    tasks = {name: task_batches(trace_root, name, tokenizer) for name in ("C-STANCE", "FOMC")}

    model.begin_task("C-STANCE")
    before = mean_loss(model, tasks["C-STANCE"])
    train(model, tasks["C-STANCE"])
    after = mean_loss(model, tasks["C-STANCE"])
    report = model.end_task()
    assert after < 0.8 * before, (before, after)
    assert report.atoms_added == 30 * 4 * 8  # 30 layers x q,k,v,o x r
    first = {n: (l.frozen_A.clone(), l.frozen_B.clone()) for n, l in model.moram_layers.items()}

    model.begin_task("FOMC")
    before = mean_loss(model, tasks["FOMC"])
    train(model, tasks["FOMC"])
    after = mean_loss(model, tasks["FOMC"])
    model.end_task()
    assert after < 0.8 * before, (before, after)
    for name, layer in model.moram_layers.items():
        A, B = first[name]
        assert torch.equal(layer.frozen_A[: len(A)], A) and torch.equal(layer.frozen_B[:, : B.shape[1]], B)
    assert model.task_names == ["C-STANCE", "FOMC"]
