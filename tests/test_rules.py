"""The small rules with one owner each (issue 23.4): a name the job config accepts the registry
accepts too, credentials are masked the same way everywhere, dotted paths set and get alike."""
import pytest

from moram_platform.config import ConfigError, config_from_dict, get_path, set_path
from moram_platform.credentials import redact
from moram_platform.registry.errors import InvalidNameError
from moram_platform.registry.names import check_name
from moram_platform.tune.runner import check_name as check_sweep_name
from moram_platform.tune.space import SpaceError


@pytest.mark.parametrize("name", ["-x", "a/b", "..", "a..b", "x" * 129, "über", "a b"])
def test_a_run_name_the_registry_refuses_is_refused_by_the_config(name):
    with pytest.raises(InvalidNameError):
        check_name("run", name)
    with pytest.raises(ConfigError, match=r"^run\.name: "):
        config_from_dict({"run": {"name": name}})


@pytest.mark.parametrize("name", ["a", "run-1.2_x", "a+b=c@d", "x" * 128])
def test_a_run_name_the_config_accepts_the_registry_accepts(name):
    assert config_from_dict({"run": {"name": name}}).run.name == check_name("run", name) == name


def test_the_config_says_what_a_run_name_may_be():
    with pytest.raises(ConfigError) as refused:
        config_from_dict({"run": {"name": "-x"}})
    assert str(refused.value) == ("run.name: must be 1-128 letters, digits and . _ - + = @, starting with a letter "
                                  "or digit (it names storage paths), got '-x'")


def test_a_sweep_name_leaves_room_for_trial_ids():
    assert check_sweep_name("sweep", "s" * 64) == "s" * 64
    with pytest.raises(SpaceError, match=r"^sweep name 'sss.*': must be 1-64 letters"):
        check_sweep_name("sweep", "s" * 65)


@pytest.mark.parametrize("text, masked", [
    ("https://user:pass@mlflow:5000", "https://***@mlflow:5000"),
    ("s3://key:secret@bucket/prefix", "s3://***@bucket/prefix"),
    ("MLflow at http://u:p@ss@host/x failed", "MLflow at http://***@host/x failed"),   # '@' in the password
    ("http://host:5000/path", "http://host:5000/path"),
    ("no uri here", "no uri here"),
])
def test_credentials_in_uris_are_masked_wherever_they_appear(text, masked):
    assert redact(text) == masked


def test_dotted_paths_set_and_get_alike():
    raw = {"train": {"lr": 1.0}}
    set_path(raw, "train.lr", 2.0)
    set_path(raw, "moram.r", 4)
    assert get_path(raw, "train.lr") == 2.0 and get_path(raw, "moram.r") == 4
    with pytest.raises(ConfigError, match=r"^train\.lr\.x: lr is not a section$"):
        set_path(raw, "train.lr.x", 1)
