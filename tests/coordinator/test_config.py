"""coordinator.toml: defaults, path resolution, and refusals of bad or unknown settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import default_toml, load_config
from coordinator.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return path


def test_default_toml_loads_with_embedded_broker_and_relative_state_dir(tmp_path: Path) -> None:
    """The file `coordinator init` writes is valid; its paths resolve next to it."""
    cfg = load_config(_write(tmp_path, default_toml("hospitals")))
    assert cfg.federation == "hospitals"
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.database == tmp_path / "state" / "coordinator.sqlite"
    assert cfg.broker.embedded and cfg.broker.port == 1883
    assert cfg.rounds.strategy == "fedavg" and cfg.rounds.strategy_args == {}
    assert cfg.model.pretrained is None
    assert "source" not in cfg.describe()


def test_full_config_with_broker_url_tls_and_strategy_args(tmp_path: Path) -> None:
    """A production-like file: TLS broker, expected nodes, fedadam arguments, weights file."""
    cfg = load_config(
        _write(
            tmp_path,
            """
federation = "f1"
state_dir = "/var/lib/fedscan"
signing_key = "keys/coord.key"
[broker]
url = "mqtts://broker.example.org"
ca_file = "certs/ca.pem"
cert_file = "certs/c.pem"
key_file = "certs/c.key"
[model]
arch = "resnet18"
init = "file"
weights_file = "weights/r18.safetensors"
[rounds]
num_rounds = 3
min_nodes = 2
expected_nodes = ["a", "b", "c"]
strategy = "fedadam"
strategy_args = { eta = 0.05 }
[validation]
max_norm_ratio = 5.0
""",
        )
    )
    assert cfg.state_dir == Path("/var/lib/fedscan")
    assert cfg.signing_key == tmp_path / "keys/coord.key"
    assert cfg.broker.tls and cfg.broker.host == "broker.example.org" and cfg.broker.port == 8883
    assert cfg.broker.ca_file == tmp_path / "certs/ca.pem"
    assert cfg.model.pretrained == str(tmp_path / "weights/r18.safetensors")
    assert cfg.rounds.expected_nodes == ("a", "b", "c")
    assert cfg.rounds.strategy_args == {"eta": 0.05}
    assert cfg.with_rounds(7).rounds.num_rounds == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('state_dir = "s"\ncolour = 1', "unknown keys"),
        ('state_dir = "s"\n[rounds]\nmin_node = 2', "unknown keys"),
        ('federation = "x"', "state_dir"),
        ('state_dir = "s"\n[broker]\nurl = "http://x:1"', "mqtt://"),
        ('state_dir = "s"\n[broker]\nurl = "mqtts://x:1"', "ca_file"),
        ('state_dir = "s"\n[rounds]\nmin_nodes = 3\nexpected_nodes = ["a"]', "min_nodes"),
        ('state_dir = "s"\n[rounds]\ntrain_mode = "all"', "train_mode"),
        ('state_dir = "s"\n[model]\ninit = "file"', "weights_file"),
        ('state_dir = "s"\nfederation = "a/b"', "federation"),
        ('state_dir = "s"\n[validation]\nmax_norm_ratio = 0.5', "max_norm_ratio"),
        ("state_dir = [", "not valid TOML"),
    ],
)
def test_bad_settings_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    """Typos and impossible values stop the coordinator with a message naming the setting."""
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
