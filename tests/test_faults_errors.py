"""A job reports a storage failure as one line naming the key, wherever Ray wrapped the error
(a remote task's failure re-raised in the driver, then chained by the caller)."""
import pytest
import ray

from moram_platform.registry import StorageError
from moram_platform.registry.errors import find_cause, find_storage_error

pytestmark = pytest.mark.slow   # starts a Ray runtime


@ray.remote
def commit_on_a_dead_server():
    raise StorageError("s3://bucket/run/versions/00000002.json: create failed: EndpointConnectionError")


def test_the_storage_error_behind_ray_wrappers_is_found_with_its_own_message():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        try:
            try:
                ray.get(commit_on_a_dead_server.remote())
            except Exception as remote:
                raise RuntimeError("training failed") from remote
        except RuntimeError as error:
            found = find_storage_error(error)
    finally:
        ray.shutdown()
    assert str(found) == "s3://bucket/run/versions/00000002.json: create failed: EndpointConnectionError"
    assert "Traceback" not in str(found)


def test_nothing_is_found_when_the_cause_is_something_else():
    try:
        raise KeyError("x") from OSError("disk")
    except KeyError as error:
        assert find_storage_error(error) is None
        assert isinstance(find_cause(error, OSError), OSError)


def test_a_full_disk_is_found_behind_wrappers_by_errno_or_message():
    import errno

    from moram_platform.registry.errors import find_disk_full

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/ray_train/ckpt/model.pt")
    try:
        raise RuntimeError("training failed") from full
    except RuntimeError as error:
        assert find_disk_full(error) is full
    try:   # pyarrow's copy errors: an OSError without errno, after an unrelated OSError
        raise RuntimeError("report failed") from OSError("[Errno 28] No space left on device. Detail: write")
    except RuntimeError as error:
        assert "No space left" in str(find_disk_full(error))
    assert find_disk_full(RuntimeError("x")) is None
    assert find_disk_full(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) is None
