"""The storage contract both backends keep (a local directory and a real S3 server), URI parsing,
name checks, and what an S3 failure may say (never a credential)."""
import threading
import traceback
from pathlib import Path

import boto3
import pytest

from moram_platform.registry import (InvalidNameError, InvalidURIError, LocalStorage, ObjectNotFoundError,
                                     S3Storage, StorageError, check_name, open_storage)
from moram_platform.stack.seaweed import free_ports

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def storage(registry_uri):
    return open_storage(registry_uri)


def test_write_then_read_round_trips_and_replaces_whole(storage):
    storage.write("run/shards/a.bin", b"first version")
    assert storage.read("run/shards/a.bin") == b"first version"
    storage.write("run/shards/a.bin", b"2nd")
    assert storage.read("run/shards/a.bin") == b"2nd"


def test_read_of_a_missing_key_names_it(storage):
    with pytest.raises(ObjectNotFoundError, match="run/versions/00000001.json"):
        storage.read("run/versions/00000001.json")


def test_create_is_create_only(storage):
    assert storage.create("run/versions/00000001.json", b"winner") is True
    assert storage.create("run/versions/00000001.json", b"loser") is False
    assert storage.read("run/versions/00000001.json") == b"winner"


def test_concurrent_creates_of_one_key_have_exactly_one_winner(storage, registry_uri):
    # every thread has its own backend object (for S3: its own connection pool); several rounds,
    # because a check-then-write race shows only now and then (fewer on SeaweedFS, which makes
    # losers of a contended conditional put wait ~1 s each)
    contenders = [open_storage(registry_uri) for _ in range(6)]
    for round_ in range(10 if isinstance(storage, LocalStorage) else 2):
        key, barrier, results = f"run/versions/{round_:08d}.json", threading.Barrier(len(contenders)), {}

        def contend(index):
            barrier.wait()
            results[index] = contenders[index].create(key, f"writer {index}".encode())

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(contenders))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [index for index, created in results.items() if created]
        assert len(winners) == 1, f"round {round_}: {len(winners)} writers created {key}"
        assert storage.read(key) == f"writer {winners[0]}".encode()


def test_children_lists_objects_and_sub_prefixes_one_level_deep(storage):
    for key in ("run-a/versions/00000001.json", "run-a/shards/x.safetensors", "run-b/versions/00000001.json"):
        storage.write(key, b"{}")
    assert storage.children("") == ["run-a", "run-b"]
    assert storage.children("run-a") == ["shards", "versions"]
    assert storage.children("run-a/versions") == ["00000001.json"]
    assert storage.children("no-such-run/versions") == []


def test_exists_and_delete(storage):
    storage.write("run/x", b"1")
    assert storage.exists("run/x") and not storage.exists("run/y")
    storage.delete("run/x")
    storage.delete("run/x")  # deleting a missing key is fine
    assert not storage.exists("run/x")


def test_local_temp_files_of_an_interrupted_write_stay_invisible(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.write("run/versions/00000001.json", b"{}")
    (tmp_path / "run" / "versions" / ".00000002.json.dead.tmp").write_bytes(b"half a manifest")
    assert storage.children("run/versions") == ["00000001.json"]
    assert not storage.exists("run/versions/00000002.json")


def test_local_io_failure_is_a_storage_error_naming_the_key(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    storage = LocalStorage(tmp_path / "a-file" / "registry")
    with pytest.raises(StorageError, match="run/shards/x"):
        storage.write("run/shards/x", b"data")


# -- URIs ------------------------------------------------------------------------------------
def test_uri_picks_the_backend(tmp_path, s3_server):
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert isinstance(open_storage(tmp_path), LocalStorage)
    local = open_storage(tmp_path.as_uri())
    assert isinstance(local, LocalStorage) and local.root == tmp_path
    s3 = open_storage("s3://moram-tests/some/prefix/")
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("moram-tests", "some/prefix")
    assert s3.uri == "s3://moram-tests/some/prefix"


def test_relative_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_storage("runs").uri == (tmp_path / "runs").as_uri()


@pytest.mark.parametrize("uri", ["", "gs://bucket/x", "file://otherhost/x", "s3://", "s3://user:pw@bucket/x"])
def test_unsupported_uris_are_rejected(uri):
    with pytest.raises(InvalidURIError) as caught:
        open_storage(uri)
    assert "pw" not in str(caught.value)


# -- names -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "../etc", "x/../y", "a..b", ".hidden",
                                  "with space", "tab\t", "a" * 129, None, 3])
def test_bad_names_are_rejected(name):
    with pytest.raises(InvalidNameError):
        check_name("run", name)


@pytest.mark.parametrize("name", ["trace-smollm2_moram", "C-STANCE", "20Minuten", "run.2026-01-31", "a=b+c@d"])
def test_ordinary_names_pass(name):
    assert check_name("task", name) == name


# -- S3 errors never carry credentials ----------------------------------------------------------
def test_s3_auth_failure_is_clear_and_leaks_no_secret(s3_server):
    wrong_secret = "wrong-" + s3_server.secret_key[::-1]
    session = boto3.session.Session(aws_access_key_id=s3_server.access_key, aws_secret_access_key=wrong_secret)
    storage = S3Storage("moram-tests", "auth-check", session=session)
    with pytest.raises(StorageError) as caught:
        storage.read("run/versions/00000001.json")
    shown = "".join(traceback.format_exception(caught.value))
    assert "auth-check/run/versions/00000001.json" in str(caught.value)
    assert "SignatureDoesNotMatch" in str(caught.value)
    for secret in (wrong_secret, s3_server.secret_key, s3_server.access_key):
        assert secret not in shown


def test_s3_unreachable_endpoint_is_a_storage_error(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_ports(1)[0]}")
    storage = S3Storage("moram-tests", "nowhere")
    with pytest.raises(StorageError, match="nowhere/run/x: write failed: EndpointConnectionError") as caught:
        storage.write("run/x", b"data")
    assert s3_server.secret_key not in "".join(traceback.format_exception(caught.value))


def test_s3_storage_reads_what_another_client_wrote(s3_server):
    # the backend speaks plain S3: objects are where the URI says, readable by any client
    S3Storage("moram-tests", "interop").write("run/x", b"payload")
    body = s3_server.client().get_object(Bucket="moram-tests", Key="interop/run/x")["Body"].read()
    assert body == b"payload"


def test_local_storage_layout_is_plain_files(tmp_path):
    LocalStorage(tmp_path).write("run/shards/x.safetensors", b"payload")
    assert Path(tmp_path / "run" / "shards" / "x.safetensors").read_bytes() == b"payload"
