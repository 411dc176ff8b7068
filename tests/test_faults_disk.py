"""A local registry on a full disk (a real 2 MB tmpfs): the commit fails with an error that names
the key and the cause, no partial version or stray temp file is left, and the same commit
succeeds once space is freed."""

import pytest

from moram_platform.registry import BaseModelRef, Registry, StorageError
from moram_platform.testing.shards import synthetic_shard
from fixtures.disk import fill, small_tmpfs

BASE = BaseModelRef("tiny-llama", "sha256:" + "0" * 64)


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path / "disk", "2m") as mount:
        yield mount


def test_a_commit_on_a_full_disk_fails_cleanly_and_succeeds_after_space_is_freed(small_disk):
    registry = Registry(small_disk / "registry")
    registry.commit("run", synthetic_shard("a", 0), base_model=BASE)
    shard = synthetic_shard("b", 1, width=256)            # ~70 KB: more than is left
    fill(small_disk)

    with pytest.raises(StorageError, match=r"registry/run/(shards|versions)/[^ ]+: (write|create) failed: "
                                           r"No space left on device"):
        registry.commit("run", shard, base_model=BASE)
    assert registry.versions("run") == [1]                # no partial version
    leftovers = [p.name for p in (small_disk / "registry").rglob("*") if p.name.startswith(".")]
    assert leftovers == []                                # no temp file left behind
    registry.verify("run", 1)

    (small_disk / "filler").unlink()
    version = registry.commit("run", shard, base_model=BASE)
    assert version.version == 2 and registry.versions("run") == [1, 2]
    registry.verify("run", 2)


def test_a_job_log_on_a_full_disk_is_one_warning_not_a_traceback_per_record(small_disk, capsys):
    import logging

    from moram_platform.console import _LazyFileHandler

    (small_disk / "logs").mkdir()
    fill(small_disk)
    handler = _LazyFileHandler(small_disk / "logs" / "run.log")
    logger = logging.getLogger("test-full-disk")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for number in range(3):
            logger.warning("record %d %s", number, "x" * 10_000)
        handler.write_lines(["a worker's line"] * 100)     # Ray workers' output, routed to the file
    finally:
        logger.removeHandler(handler)
        logging.shutdown([lambda: handler])               # as at exit: a failed flush is not raised
    err = capsys.readouterr().err
    assert err.count(f"warning: cannot write the log file {small_disk / 'logs' / 'run.log'}: No space left") == 1
    assert "Traceback" not in err and "Logging error" not in err
