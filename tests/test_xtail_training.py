"""X-TAIL training through the production path (``train_task`` + ``XTailBenchmark``, plain PyTorch
engine, one process) on real images with a small random-init open_clip ViT; the loss against a
hand computation; the text tower's padding kept out of the activation statistics."""
import math
import statistics
import warnings

import pytest
import torch

from moram import get_moram_model, read_shard
from moram.metrics import xtail_average, xtail_last, xtail_transfer
from moram_platform.config import ConfigError, config_from_dict, load_config
from moram_platform.engine import lr_schedule
from moram_platform.evaluation import evaluate_shards
from moram_platform.training import World, train_task
from moram_platform.xtail import TINY_VIT, evaluate_domains, load_backbone, load_domain, text_token_mask, xtail_loss
from moram_platform.xtail.benchmark import XTailBenchmark


def xtail_config(domains, tasks, split_dir, **train):
    """A job config of the production path: benchmark xtail, the tiny ViT, torch engine, fp32."""
    root = domains[tasks[0]].parent
    assert all(domains[name].parent == root for name in tasks)
    seed = train.pop("seed", 0)
    return config_from_dict({
        "benchmark": "xtail",
        "run": {"seed": seed},
        "model": {"source": TINY_VIT},
        "xtail": {"pretrained": None, "allow_random_init": True, "split_dir": str(split_dir)},
        "data": {"root": str(root), "tasks": list(tasks)},
        "train": {"epochs": None, "lr_schedule": "cosine", "betas": [0.9, 0.9999], "grad_clip": 0.0,
                  "precision": "fp32", "engine": "torch", "checkpoint_every_steps": 10_000, **train},
        "eval": {"batch_size": 256},
    })


def quietly(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random init, on purpose
        return function(*args, **kwargs)


# -- the loss against a hand computation ------------------------------------------------------
def test_loss_is_the_official_reduction_by_hand():
    """Two current classes after three seen ones (two earlier domains: 2 + 1 classes), three images.

    Features (unit, 2-D): images i0 = i2 = (1, 0), i1 = (0, 1); classes c0 = (1, 0), c1 = (0, 1);
    scale 1; labels [0, 1, 0]. Logits image x class: i0 [1, 0], i1 [0, 1], i2 [1, 0].
    image -> text (seen columns at -inf: a softmax over c0, c1), mean over the 3 images: every
        image has logit 1 on its class and 0 on the other: -log(e / (e + 1)) = log(1 + 1/e) each.
    text -> image, rows of [seen | current] = 5 rows over the 3 images, 0/1 targets, mean over 5:
        c0 row [1, 0, 1], positives i0, i2: 2 * -log(e / (2e + 1)) = 2 log(2 + 1/e);
        c1 row [0, 1, 0], positive i1:        -log(e / (e + 2))   = log(1 + 2/e);
        the 3 seen rows have no positive: 0.  Sum / 5.
    """
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    e = math.e
    image_to_text = math.log(1 + 1 / e)
    text_rows = 2 * math.log(2 + 1 / e) + math.log(1 + 2 / e)

    loss = xtail_loss(images, classes, torch.tensor(1.0), labels, num_seen=3)
    assert loss.item() == pytest.approx(image_to_text + text_rows / 5, abs=1e-6)
    # the first domain (nothing seen): 2 rows
    assert xtail_loss(images, classes, torch.tensor(1.0), labels, num_seen=0).item() == pytest.approx(
        image_to_text + text_rows / 2, abs=1e-6)
    # scale multiplies every logit: scale 2 by hand, after 3 seen classes
    image_to_text_2 = math.log(1 + e ** -2)
    text_rows_2 = 2 * math.log(2 + e ** -2) + math.log(1 + 2 * e ** -2)
    assert xtail_loss(images, classes, torch.tensor(2.0), labels, num_seen=3).item() == pytest.approx(
        image_to_text_2 + text_rows_2 / 5, abs=1e-6)
    # not the per-class mean of a normalised target (the earlier reduction): (log(2 + 1/e) + log(1 + 2/e)) / 2
    assert loss.item() != pytest.approx(image_to_text + (math.log(2 + 1 / e) + math.log(1 + 2 / e)) / 2, abs=1e-3)


def test_loss_through_the_forward_is_xtail_loss_of_the_features(xtail_image_domains, tmp_path):
    config = xtail_config(xtail_image_domains, ["Fashion-MNIST", "MNIST", "CIFAR-10"], tmp_path, max_steps=1,
                          global_batch_size=8, micro_batch_size=8)
    benchmark = XTailBenchmark()
    model, processor = quietly(benchmark.load_model, config)
    model.eval()
    batch = benchmark.collate(config, processor, "CIFAR-10", benchmark.train_examples(config, "CIFAR-10")[::10])
    assert batch["num_seen"] == 20 and batch["templates_per_class"] == 1
    with torch.no_grad():
        images = torch.nn.functional.normalize(model.encode_image(batch["images"]), dim=-1)
        classes = torch.nn.functional.normalize(model.encode_text(batch["tokens"]), dim=-1)
        expected = xtail_loss(images, classes, model.logit_scale.exp(), batch["labels"], 20)
        torch.testing.assert_close(benchmark.loss(model, batch), expected)


# -- the text tower's padding -----------------------------------------------------------------
def test_text_padding_counts_in_no_activation_statistic(xtail_image_domains, tmp_path):
    # Fashion-MNIST's short prompts ("a photo of a bag.") leave padding in the tiny model's 16 tokens
    config = xtail_config(xtail_image_domains, ["Fashion-MNIST"], tmp_path, max_steps=1, global_batch_size=8,
                          micro_batch_size=8)
    benchmark = XTailBenchmark()
    base, processor = quietly(benchmark.load_model, config)
    model = get_moram_model(base, config.moram_config)
    batch = benchmark.collate(config, processor, "Fashion-MNIST", benchmark.train_examples(config, "Fashion-MNIST")[:8])
    tokens = batch["tokens"]
    # open_clip: <start> prompt <end> then id 0 up to the context length; <end> is the highest id
    end = tokens.argmax(dim=-1)
    assert (tokens[torch.arange(len(tokens)), end] == 49407).all()
    assert all((row[e + 1:] == 0).all() for row, e in zip(tokens, end))
    real_tokens = int((end + 1).sum())
    assert real_tokens < tokens.numel()  # there is padding to leave out
    assert text_token_mask(tokens).sum() == real_tokens
    # a real "!" is token id 0 too: the mask follows the position, not the id
    assert text_token_mask(torch.tensor([[49406, 0, 49407, 0]])).tolist() == [[1, 1, 1, 0]]

    model.begin_task("Fashion-MNIST")
    model.train()
    benchmark.loss(model, batch).backward()
    patches = (32 // 8) ** 2 + 1
    # MoRAM's weights of a token sum to 1 (softmax, no δ in training): a layer's total mass is the
    # number of tokens it counted
    for name, layer in model.moram_layers.items():
        counted = 8 * patches if name.startswith("visual.") else real_tokens  # images have no padding
        assert layer.activation_mass.sum().item() == pytest.approx(counted, rel=1e-4), name


# -- learning, through train_task ----------------------------------------------------------------
@pytest.mark.long
@pytest.mark.timeout(1800)  # ~40 s on an idle 2-core CPU; 10+ min when the machine is shared
def test_training_a_domain_lifts_its_accuracy_well_above_the_start(xtail_image_domains, tmp_path):
    # measured: 14.8 % -> 41.2 % (the official scale 1 and loss reduction; 150 steps of at most 64 images)
    config = xtail_config(xtail_image_domains, ["Fashion-MNIST"], tmp_path, max_steps=150, lr=5e-4,
                          global_batch_size=64, micro_batch_size=64)
    benchmark = XTailBenchmark()
    quietly(benchmark.validate, config)

    before = quietly(evaluate_shards, config, benchmark, [], ["Fashion-MNIST"], progress=False)["Fashion-MNIST"]
    steps = []
    result = quietly(train_task, config, benchmark, 0, [], World(),
                     on_step=lambda progress: steps.append((progress.step, progress.losses[-1])),
                     progress_bar=False)
    after = quietly(evaluate_shards, config, benchmark, [result.shard], ["Fashion-MNIST"],
                    progress=False)["Fashion-MNIST"]
    before, after = before["score"], after["score"]

    print(f"Fashion-MNIST 16-shot: {before:.1f}% -> {after:.1f}% in {result.wall_s:.1f} s")
    assert after >= before + 25 and after >= 40, (before, after)
    losses = result.progress.losses
    assert [s for s, _ in steps] == list(range(1, 151))
    assert [loss for _, loss in steps] == losses
    assert statistics.mean(losses[-20:]) < statistics.mean(losses[:20]) - 1.0
    metrics = result.metrics()
    assert metrics["train_samples_per_s"] > 0 and metrics["train_steps"] == 150
    # 16 fresh atoms on each of the 24 layers, all kept (no pruning in the X-TAIL defaults)
    model = get_moram_model(quietly(benchmark.load_model, config)[0], config.moram_config)
    shard = read_shard(result.shard)
    assert sum(t.numel() for t in shard.tensors.values() if t.dim() == 2) == 16 * sum(
        layer.in_features + layer.out_features for layer in model.moram_layers.values())

    # the schedule the engine ran: cosine from the lr to 0 over the task's 150 steps
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.train.lr)
    schedule = lr_schedule(optimizer, config.train, 150)
    rates = []
    for _ in range(150):
        optimizer.step()
        schedule.step()
        rates.append(schedule.get_last_lr()[0])
    assert rates[0] < config.train.lr and rates[-1] == pytest.approx(0.0, abs=1e-12)


def test_config_errors_name_the_key(xtail_image_domains, tmp_path):
    with pytest.raises(ConfigError, match="train.max_steps"):
        xtail_config(xtail_image_domains, ["MNIST"], tmp_path, max_steps=0)
    with pytest.raises(ConfigError, match="train.betas"):
        xtail_config(xtail_image_domains, ["MNIST"], tmp_path, max_steps=1, betas=[0.9, 1.0])
    with pytest.raises(ConfigError, match="moram.tau"):
        load_config(None, ["benchmark=xtail", "data.root=/data/xtail", "moram.tau=0"])
    with pytest.raises(ConfigError, match=r"moram.alpha: X-TAIL trains at scale 1 .* moram.r is 8, so set moram.alpha: 8"):
        load_config(None, ["benchmark=xtail", "data.root=/data/xtail", "moram.r=8"])
    assert load_config(None, ["benchmark=xtail", "data.root=/data/xtail", "moram.r=8", "moram.alpha=8"]).moram_config.scale == 1.0


# -- a sequence of three domains through MoRAM ----------------------------------------------
ORDER = ("Fashion-MNIST", "MNIST", "CIFAR-10")


@pytest.fixture(scope="module")
def sequence(xtail_image_domains, tmp_path_factory):
    split_dir = tmp_path_factory.mktemp("splits")
    # short tasks; a random-init CLIP needs a higher lr than the pretrained reference's 5e-4
    config = xtail_config(xtail_image_domains, ORDER, split_dir, max_steps=100, lr=2e-3, global_batch_size=32,
                          micro_batch_size=32, seed=5)
    benchmark = XTailBenchmark()
    quietly(benchmark.validate, config)
    zero_shot = quietly(evaluate_shards, config, benchmark, [], list(ORDER), progress=False)
    shards, results, matrix = [], [], []
    for index in range(len(ORDER)):
        result = quietly(train_task, config, benchmark, index, list(shards), World(), progress_bar=False)
        results.append(result)
        shards.append(result.shard)
        scores = quietly(evaluate_shards, config, benchmark, shards, list(ORDER), progress=False)
        matrix.append([scores[name]["score"] for name in ORDER])
    return {"config": config, "split_dir": split_dir, "zero_shot": {n: r["score"] for n, r in zero_shot.items()},
            "results": results, "shards": shards, "matrix": matrix}


@pytest.mark.long
@pytest.mark.timeout(2400)  # runs the module's sequence fixture: 3 domains trained and scored 4 times
def test_sequence_matrix_is_every_domain_after_every_task(sequence):
    matrix, zero_shot, results = sequence["matrix"], sequence["zero_shot"], sequence["results"]
    assert [r.task for r in results] == list(ORDER)
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert all(0 <= score <= 100 for row in matrix for score in row)
    # each score is a count of correct test images out of 500
    assert all(abs(score * 5 - round(score * 5)) < 1e-9 for row in matrix for score in row)
    # the first task learnt, in the 30-class union label space (the learning test has the margins)
    assert matrix[0][0] >= zero_shot["Fashion-MNIST"] + 10, (zero_shot, matrix)
    assert [len(r.progress.losses) for r in results] == [100, 100, 100]


@pytest.mark.long
def test_every_row_is_reproduced_from_the_shards_of_that_version(sequence, xtail_image_domains):
    """base + shards[:i] (a registry version), loaded and scored by the building blocks on their
    own, scores exactly row i: old atoms stay frozen, and both evaluations agree."""
    config, shards = sequence["config"], sequence["shards"]
    domains = [load_domain(name, xtail_image_domains[name], split_dir=sequence["split_dir"]) for name in ORDER]
    backbone = quietly(load_backbone, TINY_VIT, allow_random_init=True, init_seed=5)  # the same base weights
    fresh = get_moram_model(backbone.model, config.moram_config)
    for version in range(1, 4):
        fresh.load_shards(shards[:version])
        scores = evaluate_domains(fresh, domains, tokenizer=backbone.tokenizer, transform=backbone.eval_transform)
        assert [scores[name] for name in ORDER] == sequence["matrix"][version - 1], version
        assert fresh.task_names == list(ORDER[:version])
    assert set(fresh.atom_counts().values()) == {3 * 16}  # no pruning: 16 atoms per task and layer


@pytest.mark.long
def test_transfer_average_last_follow_the_matrix(sequence):
    R = sequence["matrix"]
    # DESIGN.md: Transfer = mean over columns j>1 of mean_{i<j} R[i][j]; Average = mean of all
    # entries; Last = mean of the final row.
    transfer = statistics.mean(statistics.mean(R[i][j] for i in range(j)) for j in range(1, 3))
    assert xtail_transfer(R) == pytest.approx(transfer)
    assert xtail_average(R) == pytest.approx(statistics.mean(v for row in R for v in row))
    assert xtail_last(R) == pytest.approx(statistics.mean(R[-1]))
