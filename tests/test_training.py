"""The per-task training function without Ray: schedules, data sharding, checkpoints."""
import math

import pytest
import torch

from moram import MoRAMConfig, get_moram_model, read_shard
from moram_platform.benchmark import get_benchmark
from moram_platform.config import load_config
from moram_platform.engine import build_engine, lr_schedule
from moram_platform.training import World, shard_for_worker, train_task
from fixtures.models import tiny_llama
from fixtures.paths import PROJECT_ROOT, TRACE_500

SMOKE = PROJECT_ROOT / "jobs" / "configs" / "trace" / "smollm2-135m_moram_cpu-smoke.yaml"


def test_cosine_schedule_with_warmup():
    config = load_config(SMOKE, ["train.lr_schedule=cosine", "train.warmup_steps=2", "train.lr=1.0"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = lr_schedule(optimizer, config.train, total_steps=10)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step(), schedule.step()
    # warm-up: (s+1)/2 for s < 2; then 0.5 (1 + cos(pi (s-2)/8)): s=2 -> 1, s=6 -> 0.5, s=9 -> (1+cos(7pi/8))/2
    assert seen[:3] == [0.5, 1.0, 1.0]
    assert seen[6] == pytest.approx(0.5)
    assert seen[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


@pytest.mark.parametrize("method", ["moram", "olora"])
def test_the_engine_loss_adds_the_methods_extra_loss(method):
    train = load_config(SMOKE, ["train.engine=torch"]).train
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=2, method=method, dropout=0.0))
    model.begin_task("t0"), model.end_task()
    model.begin_task("t1")
    model.train()
    batch = {"input_ids": torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))}
    batch["labels"] = batch["input_ids"]

    def loss_fn(forward_model, batch):
        return forward_model(**batch).loss

    engine = build_engine(model, loss_fn, train, world_size=1, total_steps=1)
    task_loss = loss_fn(model, batch)
    if method == "moram":
        assert torch.equal(engine.loss(batch), task_loss)   # no extra term: bit-identical
    else:
        # λ1 = 0.5 (default), λ2 = 0: 0.5 Σ_layers Σ|A_old A_newᵀ|, summed by hand here
        by_hand = sum(0.5 * (l.frozen_A @ l.A.t()).abs().sum() for l in model.moram_layers.values())
        assert by_hand > 0
        torch.testing.assert_close(engine.loss(batch), task_loss + by_hand)


def test_every_worker_gets_an_equal_disjoint_share():
    config = load_config(SMOKE)
    examples = list(range(11))
    shares = [shard_for_worker(examples, config, 0, epoch=0, world=World(rank, 3)) for rank in range(3)]
    assert all(len(s) == 3 for s in shares)                       # 11 // 3, the rest dropped
    assert len(set().union(*map(set, shares))) == 9
    assert shares[0] == shard_for_worker(examples, config, 0, epoch=0, world=World(0, 3))
    assert shares[0] != shard_for_worker(examples, config, 0, epoch=1, world=World(0, 3))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_a_task_interrupted_and_resumed_from_its_checkpoint_matches_one_run(engine, tmp_path):
    config = load_config(SMOKE, [
        f"data.root={TRACE_500}", "data.tasks=[FOMC]", "data.max_train_examples=12", "data.max_prompt_tokens=64",
        "train.global_batch_size=4", "train.micro_batch_size=2", "scaling.num_workers=1", f"train.engine={engine}",
        "moram.dropout=0.0", "train.checkpoint_every_steps=1",
    ]).with_absolute_paths()
    benchmark = get_benchmark("trace")
    checkpoints = {}

    def keep(progress, save):
        folder = tmp_path / f"step-{progress.step}"
        save(folder)
        checkpoints[progress.step] = folder

    try:
        whole = train_task(config, benchmark, 0, [], on_checkpoint=keep, progress_bar=False)
        resumed = train_task(config, benchmark, 0, [], checkpoint_dir=checkpoints[1], progress_bar=False)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert whole.progress.step == resumed.progress.step == 3 and resumed.resumed_from_step == 1
    assert resumed.progress.losses[:1] == whole.progress.losses[:1]   # restored history
    a, b = read_shard(whole.shard), read_shard(resumed.shard)
    for name in a.layer_names:
        torch.testing.assert_close(b.layer(name)["B"], a.layer(name)["B"], rtol=1e-4, atol=1e-6)
    assert whole.metrics()["atoms_added"] == 30 * 4 * 8
