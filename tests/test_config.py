"""Every config error names its field and the allowed range."""
import pytest

from moram import MoRAMConfig, MoRAMConfigError


@pytest.mark.parametrize("changes, message", [
    ({"k": 0}, "k: must be an integer >= 1"),
    ({"r": 0}, "r: must be an integer >= 1"),
    ({"r": 2.5}, "r: must be an integer >= 1"),
    ({"tau": 0}, "tau: tau must be > 0"),
    ({"tau": -0.1}, "tau: tau must be > 0"),
    ({"delta": 1.5}, r"delta: delta must be in \[0, 1\]"),
    ({"delta": -0.01}, r"delta: delta must be in \[0, 1\]"),
    ({"prune_mass": 0.0}, r"prune_mass: prune_mass must be in \(0, 1\]"),
    ({"prune_mass": 1.01}, r"prune_mass: prune_mass must be in \(0, 1\]"),
    ({"method": "lora"}, r"method: unknown method 'lora'; choose one of \['moram', 'seqlora', 'inclora', 'moelora', 'olora'\]"),
    ({"dropout": 1.0}, r"dropout: dropout must be in \[0, 1\)"),
    ({"alpha": 0}, "alpha: alpha must be > 0"),
    ({"target_modules": []}, "target_modules: must be a non-empty list"),
])
def test_invalid_values_are_named(changes, message):
    with pytest.raises(MoRAMConfigError, match=message):
        MoRAMConfig(**changes)


def test_unknown_key_is_named():
    with pytest.raises(MoRAMConfigError, match="temperature: unknown MoRAM config key"):
        MoRAMConfig.from_dict({"temperature": 0.1})


def test_defaults_are_the_reference_trace_settings_and_round_trip():
    config = MoRAMConfig()
    assert (config.r, config.k, config.tau, config.delta, config.dropout) == (8, 8, 0.03, 0.2, 0.1)
    assert config.alpha == 16 and config.scale == 2.0 and config.prune_mass == 0.99
    assert MoRAMConfig.from_dict(config.to_dict()) == config
