"""X-TAIL domains: image folders with class names, prompt templates and a persisted few-shot split.

A domain is a folder (local path, ``file://`` or ``s3://`` URI)::

    <root>/train/<class folder>/<image>     the few-shot training images are drawn from here
    <root>/test/<class folder>/<image>      every test image is scored
    <root>/classnames.json                  optional {class folder: prompt name}

``load_domain`` scans it, draws the few-shot split once per (domain, shots, seed) into a JSON
file and reuses it on every later call, and checks every image it will read (open + header
verify) so that a bad file fails the run before any training, by name.
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
DEFAULT_TEMPLATE = "a photo of a {}."

# The X-TAIL order; each domain's prompt template and class names as the official code has them
# (official_domains.json, package data: one template per domain, a class-name map or "folder").
XTAIL_DOMAINS = ("Aircraft", "Caltech101", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet",
                 "Cars", "SUN397")
OFFICIAL_DOMAINS_FILE = Path(__file__).with_name("official_domains.json")
_OFFICIAL: dict[str, dict] = json.loads(OFFICIAL_DOMAINS_FILE.read_text())["domains"]
XTAIL_TEMPLATES: dict[str, tuple[str, ...]] = {name: (entry["template"],) for name, entry in _OFFICIAL.items()}
XTAIL_CLASSNAMES: dict[str, dict[str, str] | str] = {name: entry["classnames"] for name, entry in _OFFICIAL.items()}


class DomainError(ValueError):
    """A domain folder, split file or image is unusable; the message names it."""


@dataclass(frozen=True)
class Domain:
    """One X-TAIL domain, ready to train and score. Labels index ``classnames`` (sorted folders)."""

    name: str
    root: Path
    classnames: tuple[str, ...]             # prompt names, in label order
    templates: tuple[str, ...]              # each with one "{}" for the class name
    train: tuple[tuple[Path, int], ...]     # the few-shot split
    test: tuple[tuple[Path, int], ...]
    split_file: Path

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self) -> list[list[str]]:
        """[class][template] prompt strings."""
        return [[template.format(name) for template in self.templates] for name in self.classnames]


class ImageSamples(Dataset):
    """(image tensor, label) for a list of (path, label)."""

    def __init__(self, samples, transform):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


def load_domain(name: str, source: str | os.PathLike, *, shots: int = 16, seed: int = 0,
                templates: list[str] | tuple[str, ...] | None = None,
                split_dir: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None, verify_images: bool = True,
                save_split: bool = True) -> Domain:
    """Scan, split and validate a domain.

    ``templates`` defaults to the X-TAIL template of ``name``, else "a photo of a {}.".
    The split file ``<name>_<shots>shot_seed<seed>.json`` goes to ``split_dir``, else the domain
    root; a newly drawn split is written only once its images passed the checks. An ``s3://``
    source is first mirrored into ``cache_dir`` (boto3, standard AWS chain).
    ``verify_images=False`` skips opening every image (a process whose driver already checked
    the same folder, e.g. a Ray worker); the folder and split checks still run.
    ``save_split=False`` keeps a newly drawn split in memory only (check several domains before
    writing any split file; the draw is deterministic, so a later call saves the same split).
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise DomainError(f"domain {name}: shots must be an integer >= 1, got {shots!r}")
    root = resolve_source(source, cache_dir)
    folders = _class_folders(root / "train")
    test_folders = _class_folders(root / "test")
    if test_folders != folders:
        only_train, only_test = sorted(set(folders) - set(test_folders)), sorted(set(test_folders) - set(folders))
        raise DomainError(f"domain {name} ({root}): train/ and test/ have different classes "
                          f"(only in train: {only_train[:5]}, only in test: {only_test[:5]})")
    split_file = Path(split_dir or root) / f"{name}_{shots}shot_seed{seed}.json"
    chosen, drawn = _load_or_draw_split(name, root, folders, shots, seed, split_file)
    train = tuple((root / rel, label) for label, folder in enumerate(folders) for rel in chosen[folder])
    test = tuple((path, label) for label, folder in enumerate(folders)
                 for path in _images(root / "test" / folder))
    if verify_images:
        validate_images(path for path, _ in train + test)
    if drawn and save_split:
        _save_split(split_file, name, shots, seed, chosen)
    return Domain(name=name, root=root, classnames=_prompt_names(name, root, folders),
                  templates=_check_templates(name, templates or XTAIL_TEMPLATES.get(name, (DEFAULT_TEMPLATE,))),
                  train=train, test=test, split_file=split_file)


def validate_images(paths) -> int:
    """Open every image and verify its header (no decode); the first bad file is an error."""
    count = 0
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            raise DomainError(f"{path}: not a readable image ({type(error).__name__}: {error})") from error
        count += 1
    return count


# -- folders --------------------------------------------------------------------------------
def resolve_source(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder of a domain: a path, ``file://`` URI, or an ``s3://`` URI mirrored locally."""
    text = str(source)
    if text.startswith("s3://"):
        return fetch_s3_folder(text, cache_dir)
    root = Path(text.removeprefix("file://")).expanduser()
    if not root.is_dir():
        raise DomainError(f"domain folder {root} does not exist")
    return root


def _class_folders(split: Path) -> list[str]:
    if not split.is_dir():
        raise DomainError(f"{split}: missing (a domain needs train/<class>/ and test/<class>/ folders)")
    folders = sorted(entry.name for entry in split.iterdir() if entry.is_dir())
    if not folders:
        raise DomainError(f"{split}: no class folders")
    for folder in folders:
        if not _images(split / folder):
            raise DomainError(f"{split / folder}: empty class folder (no image files)")
    return folders


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _prompt_names(name: str, root: Path, folders: list[str]) -> tuple[str, ...]:
    """The class names prompts are made of, by label. ``<root>/classnames.json`` names any folder;
    the others take the official name of an X-TAIL domain (``XTAIL_CLASSNAMES``: a map, or the
    folder's name verbatim), else the folder's name with underscores as spaces."""
    mapping_file = root / "classnames.json"
    mapping = {}
    if mapping_file.is_file():
        mapping = json.loads(mapping_file.read_text())
        unknown = sorted(set(mapping) - set(folders))
        if unknown:
            raise DomainError(f"{mapping_file}: names class folders that do not exist: {unknown[:5]}")
    official = XTAIL_CLASSNAMES.get(name)
    if official == "folder":
        names = {folder: folder for folder in folders}
    elif isinstance(official, dict):
        unnamed = sorted(set(folders) - set(official) - set(mapping))
        if unnamed:
            raise DomainError(f"domain {name} ({root}): class folders {unnamed[:5]} are not in the official "
                              f"class-name map of {name} ({OFFICIAL_DOMAINS_FILE.name}: {sorted(official)[:5]}...); "
                              f"name the folders as docs/xtail.md says, or name them in {mapping_file}")
        names = {folder: official.get(folder, folder) for folder in folders}
    else:
        names = {folder: folder.replace("_", " ") for folder in folders}
    names.update(mapping)
    return tuple(names[folder] for folder in folders)


def _check_templates(name: str, templates) -> tuple[str, ...]:
    templates = tuple(templates)
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise DomainError(f"domain {name}: template {template!r} must contain exactly one '{{}}'")
    return templates


# -- the few-shot split ---------------------------------------------------------------------
def _load_or_draw_split(name: str, root: Path, folders: list[str], shots: int, seed: int,
                        split_file: Path) -> tuple[dict[str, list[str]], bool]:
    """(the split, whether it was drawn now and still has to be saved)."""
    if split_file.is_file():
        return _read_split(split_file, root, folders), False
    chosen = {}
    for folder in folders:
        files = [p.relative_to(root).as_posix() for p in _images(root / "train" / folder)]
        if len(files) < shots:
            raise DomainError(f"{root / 'train' / folder}: {len(files)} images, fewer than shots={shots}")
        # One generator per class: the draw of a class depends only on (domain, seed, class).
        chosen[folder] = sorted(random.Random(f"{name}:{seed}:{folder}").sample(files, shots))
    return chosen, True


def _save_split(split_file: Path, name: str, shots: int, seed: int, chosen: dict[str, list[str]]) -> None:
    record = {"domain": name, "shots": shots, "seed": seed, "classes": chosen}
    _write_atomically(split_file, json.dumps(record, indent=1))
    logger.info("domain %s: drew a %d-shot split (seed %d) into %s", name, shots, seed, split_file)


def _read_split(split_file: Path, root: Path, folders: list[str]) -> dict[str, list[str]]:
    try:
        chosen = json.loads(split_file.read_text())["classes"]
    except (ValueError, KeyError, TypeError) as error:
        raise DomainError(f"{split_file}: not a split file ({error})") from error
    if not isinstance(chosen, dict) or not all(
            isinstance(files, list) and all(isinstance(f, str) for f in files) for files in chosen.values()):
        raise DomainError(f"{split_file}: not a split file (\"classes\" must map each class folder to a list of "
                          f"image paths)")
    if set(chosen) != set(folders):
        raise DomainError(f"{split_file}: its classes do not match {root / 'train'} (only in the split: "
                          f"{sorted(set(chosen) - set(folders))[:5]}, only in the folder: "
                          f"{sorted(set(folders) - set(chosen))[:5]}); the folder changed since the split "
                          f"was drawn")
    for folder in folders:
        for rel in chosen[folder]:
            if not (root / rel).is_file():
                raise DomainError(f"{split_file}: lists {root / rel}, which no longer exists; the folder "
                                  f"changed since the split was drawn")
    return chosen


def _write_atomically(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        partial.write_text(text)
        os.replace(partial, path)  # workers drawing the same split concurrently write the same bytes
    except OSError as error:
        raise DomainError(f"{path}: cannot write the split file ({error}); pass split_dir= a writable "
                          f"folder") from error


# -- s3 -------------------------------------------------------------------------------------
def fetch_s3_folder(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Mirror ``s3://bucket/prefix`` into ``cache_dir/bucket/prefix``; files already there with the
    same size are kept. Credentials and endpoint come from boto3's standard chain
    (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ~/.aws, instance roles...)."""
    import boto3

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    if not bucket or not prefix:
        raise DomainError(f"{uri}: an s3 domain needs s3://<bucket>/<prefix>")
    target = Path(cache_dir or Path.home() / ".cache" / "moram" / "domains") / bucket / prefix
    client = boto3.client("s3")
    count = fetched = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix) + 1:]
            destination = (target / relative).resolve()
            if not relative or relative.endswith("/"):
                continue
            if not destination.is_relative_to(target.resolve()):
                raise DomainError(f"{uri}: object key {item['Key']!r} escapes the domain folder")
            count += 1
            if destination.is_file() and destination.stat().st_size == item["Size"]:
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            partial = destination.with_name(f"{destination.name}.partial-{os.getpid()}")
            client.download_file(bucket, item["Key"], str(partial))
            os.replace(partial, destination)
            fetched += 1
    if count == 0:
        raise DomainError(f"{uri}: no objects under this prefix")
    logger.info("domain %s: %d files in %s (%d downloaded)", uri, count, target, fetched)
    return target
