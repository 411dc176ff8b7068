"""X-TAIL domains: persisted few-shot splits, up-front validation, templates, s3 sources."""
import json
import re
import shutil
import uuid

import pytest
from fixtures.images import copy_domain
from fixtures.s3 import TEST_BUCKET

from moram_platform.xtail import DEFAULT_TEMPLATE, XTAIL_TEMPLATES, DomainError, load_domain


def _relative(domain):
    return [(path.relative_to(domain.root).as_posix(), label) for path, label in domain.train]


def test_split_is_drawn_once_saved_and_reused(xtail_image_domains, tmp_path):
    root = xtail_image_domains["MNIST"]
    first = load_domain("MNIST", root, shots=16, seed=0, split_dir=tmp_path)

    assert first.split_file == tmp_path / "MNIST_16shot_seed0.json"
    record = json.loads(first.split_file.read_text())
    assert (record["domain"], record["shots"], record["seed"]) == ("MNIST", 16, 0)
    assert sorted(record["classes"]) == [str(d) for d in range(10)]
    assert all(len(files) == 16 for files in record["classes"].values())
    assert len(first.train) == 160 and len(set(path for path, _ in first.train)) == 160
    assert all(path.parent.name == sorted(record["classes"])[label] for path, label in first.train)  # label = sorted folder

    # The rerun reads the file: edit it by hand and the edit is what gets trained on.
    record["classes"]["3"] = record["classes"]["3"][:1] * 16
    first.split_file.write_text(json.dumps(record))
    reread = load_domain("MNIST", root, shots=16, seed=0, split_dir=tmp_path)
    assert [p.relative_to(root).as_posix() for p, label in reread.train if label == 3] == record["classes"]["3"]

    # Drawn again from scratch, the same (domain, seed) gives the same images...
    first.split_file.unlink()
    redrawn = load_domain("MNIST", root, shots=16, seed=0, split_dir=tmp_path)
    assert _relative(redrawn) == _relative(first)
    # ...and another seed another split, in a file of its own.
    other = load_domain("MNIST", root, shots=16, seed=1, split_dir=tmp_path)
    assert other.split_file == tmp_path / "MNIST_16shot_seed1.json"
    assert set(_relative(other)) != set(_relative(first))
    assert len(set(_relative(other)) & set(_relative(first))) < 100


def test_split_defaults_to_the_domain_folder(xtail_image_domains, tmp_path):
    root = copy_domain(xtail_image_domains["MNIST"], tmp_path / "MNIST", classes=2)
    domain = load_domain("MNIST", root, shots=4)
    assert domain.split_file == root / "MNIST_4shot_seed0.json" and domain.split_file.is_file()
    assert len(domain.train) == 8 and len(domain.test) == 100


def test_split_listing_a_removed_file_is_an_error_naming_it(xtail_image_domains, tmp_path):
    root = copy_domain(xtail_image_domains["MNIST"], tmp_path / "MNIST", classes=3)
    domain = load_domain("MNIST", root, shots=16)
    removed = domain.train[5][0]
    removed.unlink()
    with pytest.raises(DomainError, match=re.escape(f"{domain.split_file}: lists {removed}, which no longer exists")):
        load_domain("MNIST", root, shots=16)


def test_split_of_a_folder_whose_classes_changed_is_an_error(xtail_image_domains, tmp_path):
    root = copy_domain(xtail_image_domains["MNIST"], tmp_path / "MNIST", classes=3)
    load_domain("MNIST", root, shots=16)
    copy_domain(xtail_image_domains["MNIST"], tmp_path / "extra", classes=4)
    for split in ("train", "test"):
        (tmp_path / "extra" / split / "3").rename(root / split / "3")
    with pytest.raises(DomainError, match=r"only in the folder: \['3'\]"):
        load_domain("MNIST", root, shots=16)


@pytest.mark.parametrize("split", ["train", "test"])
def test_corrupt_image_is_an_error_naming_the_file(xtail_image_domains, tmp_path, split):
    root = copy_domain(xtail_image_domains["CIFAR-10"], tmp_path / "CIFAR-10", classes=3)
    domain = load_domain("CIFAR-10", root, shots=16)
    victim = domain.train[20][0] if split == "train" else domain.test[-1][0]
    assert victim.suffix == ".jpg" and split in victim.parts
    victim.write_bytes(b"this is not a JPEG at all" * 10)
    with pytest.raises(DomainError, match=re.escape(f"{victim}: not a readable image")):
        load_domain("CIFAR-10", root, shots=16)


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_class_folder_is_an_error_naming_the_folder(xtail_image_domains, tmp_path, split):
    root = copy_domain(xtail_image_domains["MNIST"], tmp_path / "MNIST", classes=3)
    (root / split / "9").mkdir()
    (root / split / "9" / "notes.txt").write_text("not an image")
    with pytest.raises(DomainError, match=re.escape(f"{root / split / '9'}: empty class folder")):
        load_domain("MNIST", root, shots=16)


def test_too_few_images_for_the_shots_is_an_error_naming_the_folder(xtail_image_domains, tmp_path):
    root = copy_domain(xtail_image_domains["MNIST"], tmp_path / "MNIST", classes=2)
    with pytest.raises(DomainError, match=re.escape(f"{root / 'train' / '0'}: 32 images, fewer than shots=33")):
        load_domain("MNIST", root, shots=33)


def test_missing_split_folder_is_an_error(xtail_image_domains, tmp_path):
    root = copy_domain(xtail_image_domains["MNIST"], tmp_path / "MNIST", classes=2)
    (root / "test").rename(root / "val")
    with pytest.raises(DomainError, match=re.escape(f"{root / 'test'}: missing")):
        load_domain("MNIST", root)


def test_templates_and_prompt_names(xtail_image_domains, tmp_path):
    mnist = load_domain("MNIST", xtail_image_domains["MNIST"], split_dir=tmp_path)
    assert mnist.templates == XTAIL_TEMPLATES["MNIST"]
    # the official prompt (XTAIL/scenario_datasets/collections.py): torchvision's class "7 - seven",
    # wrapped as 'number: "{}"', in the template 'a photo of the number: "{}".'
    assert mnist.prompts()[7] == ['a photo of the number: "number: "7 - seven"".']

    fashion = load_domain("Fashion-MNIST", xtail_image_domains["Fashion-MNIST"], split_dir=tmp_path)
    assert fashion.templates == (DEFAULT_TEMPLATE,)
    assert "ankle boot" in fashion.classnames  # folder ankle_boot

    root = copy_domain(xtail_image_domains["MNIST"], tmp_path / "digits", classes=2)
    (root / "classnames.json").write_text(json.dumps({"0": "zero"}))
    named = load_domain("digits", root, templates=["{} (a digit)", "the number {}"])
    assert named.classnames == ("zero", "1")
    assert named.prompts() == [["zero (a digit)", "the number zero"], ["1 (a digit)", "the number 1"]]

    with pytest.raises(DomainError, match="template 'a photo' must contain exactly one"):
        load_domain("digits", root, templates=["a photo"])
    (root / "classnames.json").write_text(json.dumps({"7": "seven"}))
    with pytest.raises(DomainError, match=r"classnames.json: names class folders that do not exist: \['7'\]"):
        load_domain("digits", root)


def test_official_prompts_of_eurosat_and_food(xtail_image_domains, tmp_path):
    """The official code's prompts (XTAIL/scenario_datasets/eurosat.py, food101.py), written out by
    hand: EuroSAT's CoOp class name + ' satellite location' in 'a centered satellite photo of the
    {}.'; Food-101's folder name, underscores kept, in 'a photo of a {}, a type of food.'."""
    source = xtail_image_domains["MNIST"]
    eurosat, food = tmp_path / "EuroSAT", tmp_path / "Food"
    for split in ("train", "test"):
        for target, folder, digit in ((eurosat, "AnnualCrop", "0"), (eurosat, "SeaLake", "1"),
                                      (food, "apple_pie", "0"), (food, "hot_and_sour_soup", "1")):
            shutil.copytree(source / split / digit, target / split / folder)
    assert load_domain("EuroSAT", eurosat, split_dir=tmp_path).prompts() == [
        ["a centered satellite photo of the Annual Crop Land satellite location."],
        ["a centered satellite photo of the Sea or Lake satellite location."]]
    assert load_domain("Food", food, split_dir=tmp_path).prompts() == [
        ["a photo of a apple_pie, a type of food."], ["a photo of a hot_and_sour_soup, a type of food."]]

    # a folder the official map does not know is an error naming it, unless classnames.json names it
    shutil.copytree(source / "train" / "2", eurosat / "train" / "Glacier")
    shutil.copytree(source / "test" / "2", eurosat / "test" / "Glacier")
    with pytest.raises(DomainError, match=r"domain EuroSAT .*class folders \['Glacier'\] are not in the official "
                                          r"class-name map of EuroSAT"):
        load_domain("EuroSAT", eurosat, split_dir=tmp_path / "other")
    (eurosat / "classnames.json").write_text(json.dumps({"Glacier": "Glacier satellite location"}))
    assert load_domain("EuroSAT", eurosat, split_dir=tmp_path / "other").classnames[1] == "Glacier satellite location"


def test_s3_domain_is_mirrored_into_the_cache_and_loaded(xtail_image_domains, tmp_path, s3_server):
    local = load_domain("MNIST", copy_domain(xtail_image_domains["MNIST"], tmp_path / "local", classes=3))
    client = s3_server.client()
    prefix = f"domains-{uuid.uuid4().hex[:8]}/MNIST"
    for path in sorted(local.root.rglob("*")):
        if path.is_file():  # the split file goes too: a shared split travels with the data
            client.upload_file(str(path), TEST_BUCKET, f"{prefix}/{path.relative_to(local.root).as_posix()}")

    remote = load_domain("MNIST", f"s3://{TEST_BUCKET}/{prefix}", cache_dir=tmp_path / "cache")
    assert remote.root == tmp_path / "cache" / TEST_BUCKET / prefix
    assert remote.classnames == local.classnames
    assert _relative(remote) == _relative(local)
    assert [(p.relative_to(remote.root), label) for p, label in remote.test] == \
        [(p.relative_to(local.root), label) for p, label in local.test]
    assert all(path.read_bytes() == (local.root / path.relative_to(remote.root)).read_bytes()
               for path, _ in remote.train)

    with pytest.raises(DomainError, match="no objects under this prefix"):
        load_domain("MNIST", f"s3://{TEST_BUCKET}/nothing-here", cache_dir=tmp_path / "cache")
