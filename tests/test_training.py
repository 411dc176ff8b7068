"""The per-task training function without Ray: schedules, data sharding, checkpoints."""
import math

import pytest
import torch

from moram import MoRAMConfig, get_moram_model, read_shard
from moram_platform.benchmark import get_benchmark
from moram_platform.config import load_config
from moram_platform.engine import build_engine, lr_schedule
from moram_platform.training import World, micro_batch_seed, shard_for_worker, train_task
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
        f"data.root={TRACE_500}", "data.tasks=[FOMC]", "data.max_train_examples=12", "trace.max_prompt_tokens=64",
        "train.global_batch_size=4", "train.micro_batch_size=2", "scaling.num_workers=1", f"train.engine={engine}",
        # dropout on: its masks come from per-micro-batch seeds (training.micro_batch_seed), so
        # the resumed steps draw what the uninterrupted ones drew (with one task-level seed they
        # would not, and B would differ)
        "moram.dropout=0.1", "train.checkpoint_every_steps=1",
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
        for field in ("A", "B", "routing_mass"):
            torch.testing.assert_close(b.layer(name)[field], a.layer(name)[field], rtol=1e-4, atol=1e-6,
                                       msg=f"{name}.{field}")
    assert whole.metrics()["atoms_added"] == 30 * 4 * 8


def test_micro_batch_seeds_differ_by_task_epoch_micro_batch_and_worker():
    seeds = {micro_batch_seed(42, task, epoch, index, rank)
             for task in range(3) for epoch in range(3) for index in range(50) for rank in range(4)}
    assert len(seeds) == 3 * 3 * 50 * 4 and all(0 <= s < 2**63 for s in seeds)
    assert micro_batch_seed(42, 1, 0, 7, 0) == micro_batch_seed(42, 1, 0, 7, 0) != micro_batch_seed(43, 1, 0, 7, 0)


# -- train.optimizer_across_tasks: carry (the official TRACE code's optimizer; docs/parity.md M2) --
def test_a_carried_optimizer_moves_the_previous_tasks_values_with_its_moments():
    # By hand, AdamW (wd 0) as torch documents it, for the first step of task 1: gradients g of the
    # fresh atoms, moments m0/v0 and step count 2 of task 0, and the update applied to task 0's
    # trained values (ZeRO-2's master copies; Artificer-AI-Lab/MoRAM TRACE/utils/my_peft/tuners/
    # moram.py:88-89 re-initialises only the model's weights).
    train = load_config(SMOKE, ["train.engine=torch", "train.grad_clip=0", "train.global_batch_size=2", "scaling.num_workers=1",
                                "train.optimizer_across_tasks=carry"]).train
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=2, dropout=0.0))
    model.train()
    batch = {"input_ids": torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))}
    batch["labels"] = batch["input_ids"]

    def loss_fn(forward_model, batch):
        return forward_model(**batch).loss

    def one_step(engine):
        engine.backward(engine.loss(batch))
        assert engine.step()

    model.begin_task("t0")
    first = build_engine(model, loss_fn, train, world_size=1, total_steps=2)
    one_step(first), one_step(first)
    trained = [p.detach().clone() for p in first.params]
    m0 = [first.optimizer.state[p]["exp_avg"].clone() for p in first.params]
    v0 = [first.optimizer.state[p]["exp_avg_sq"].clone() for p in first.params]
    carried = first.carry_state()
    model.end_task(prune=False)

    model.begin_task("t1")
    second = build_engine(model, loss_fn, train, world_size=1, total_steps=2)
    second.carry_over(carried)
    fresh = [p.detach().clone() for p in second.params]
    assert not any(torch.equal(f, t) for f, t in zip(fresh, trained) if f.abs().sum() > 0)
    second.backward(second.loss(batch))
    grads = [p.grad.clone() for p in second.params]
    assert all(torch.equal(p, f) for p, f in zip(second.params, fresh))   # the forward saw fresh atoms
    assert second.step()
    (b1, b2), lr, eps, t = train.betas, train.lr, 1e-8, 3
    for p, x, m, v, g in zip(second.params, trained, m0, v0, grads):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        expected = x - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)


def test_carry_needs_the_previous_tasks_state_and_a_constant_schedule(tmp_path):
    from moram_platform.config import ConfigError
    from moram_platform.training import read_carry

    config = load_config(SMOKE, ["train.optimizer_across_tasks=carry"])
    assert read_carry(config, 0, None, World()) is None                       # task 0 starts fresh
    assert read_carry(load_config(SMOKE), 1, tmp_path, World()) is None       # the default: fresh
    with pytest.raises(FileNotFoundError, match=r"train.optimizer_across_tasks: carry: task 1 continues the "
                                                r"optimizer of task 0, but .*optimizer-rank0.pt was not written"):
        read_carry(config, 1, tmp_path, World())
    with pytest.raises(ConfigError, match="train.optimizer_across_tasks: carry continues one schedule .* needs "
                                          "train.lr_schedule: constant, got 'carry'"):
        load_config(SMOKE, ["train.optimizer_across_tasks=carry", "train.lr_schedule=cosine"])


@pytest.fixture
def one_process_group():
    """A fresh one-process group per test: DeepSpeed caches the world group it first saw, which
    an earlier test may have destroyed."""
    from deepspeed.utils import groups

    groups._WORLD_GROUP = None
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    groups._WORLD_GROUP = None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["carry", "fresh"])
def test_train_task_carries_the_optimizer_into_the_next_task(mode, tmp_path, tiny_lm_dir, one_process_group):
    # DeepSpeed ZeRO-2, one process: task 1 continues task 0's optimizer (4 Adam steps in all)
    # and its block continues task 0's trained atoms; with "fresh" it starts from new atoms.
    config = load_config(SMOKE, [
        f"model.source={tiny_lm_dir}", f"data.root={TRACE_500}", "data.tasks=[FOMC, C-STANCE]",
        "data.max_train_examples=4", "trace.max_prompt_tokens=48", "trace.max_answer_tokens=4",
        "train.epochs=1", "train.global_batch_size=2", "train.micro_batch_size=2", "scaling.num_workers=1", "moram.dropout=0.0",
        "moram.prune_mass=null", "moram.target_modules=[q_proj, v_proj]", f"train.optimizer_across_tasks={mode}",
    ]).with_absolute_paths()
    benchmark = get_benchmark("trace")
    first = train_task(config, benchmark, 0, [], carry_to=tmp_path / "task-0", progress_bar=False)
    second = train_task(config, benchmark, 1, [first.shard], carry_from=tmp_path / "task-0",
                        carry_to=tmp_path / "task-1", progress_bar=False)
    assert first.progress.step == second.progress.step == 2
    a, b = read_shard(first.shard), read_shard(second.shard)
    moved = max((b.layer(n)["A"] - a.layer(n)["A"]).abs().max().item() for n in a.layer_names)
    if mode == "fresh":
        assert not (tmp_path / "task-0").exists()
        assert moved > 0.05                           # new kaiming atoms, nowhere near task 0's
        return
    carried = torch.load(tmp_path / "task-1" / "optimizer-rank0.pt", weights_only=True)
    assert [s["step"].item() for s in carried["optimizer"]["state"].values()] == [4.0]   # one flat ZeRO group
    assert carried["scheduler"]["last_epoch"] == 4
    assert 0 < moved <= 2 * config.train.lr * 1.01    # two Adam steps (each at most ~lr) from task 0's atoms
