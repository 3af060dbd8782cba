"""[dicom] in node.toml: nested tables parsed and validated like every other section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge_node.config import config_from_dict
from edge_node.errors import ConfigError

PATHS = {"inbox": "i", "state_dir": "s", "quarantine_dir": "q", "model_dir": "m"}


def _load(dicom: dict[str, Any]) -> Any:
    return config_from_dict({"node_id": "n", "paths": PATHS, "dicom": dicom}, Path("/site"))


def test_defaults_are_off_and_tables_parse() -> None:
    """Without [dicom] nothing runs; the tables set the listener and PACS, paths resolve."""
    off = config_from_dict({"node_id": "n", "paths": PATHS}, Path("/site")).dicom
    assert not off.listener.enabled and not off.send_to.enabled and off.results_dir is None
    cfg = _load(
        {
            "listener": {"enabled": True, "port": 11112, "allowed_calling_aes": ["CT1"]},
            "send_to": {"enabled": True, "host": "pacs", "port": 104, "tls_ca": "ca.pem"},
            "results_dir": "results",
        }
    ).dicom
    assert cfg.listener.allowed_calling_aes == ("CT1",)
    assert cfg.send_to.tls_ca == Path("/site/ca.pem")
    assert cfg.results_dir == Path("/site/results")


@pytest.mark.parametrize(
    ("dicom", "message"),
    [
        ({"listener": {"enabled": True, "host": "0.0.0.0"}}, "requires allowed_calling_aes"),
        ({"listener": {"ae_title": "A" * 17}}, "ae_title"),
        ({"listener": {"allowed_calling_aes": ["bad\\ae"]}}, "allowed_calling_aes"),
        ({"listener": {"dest_subdir": "../elsewhere"}}, "dest_subdir"),
        ({"listener": {"dest_subdir": ".hidden"}}, "hidden"),
        ({"listener": {"tls_cert": "c.pem"}}, "tls_cert and tls_key"),
        ({"listener": {"prot": 104}}, "unknown keys"),
        ({"send_to": {"retry_base_s": 10, "retry_cap_s": 1}}, "retry_base_s"),
        ({"send_to": {"port": 0}}, "port"),
        ({"send_to": {"tls_cert": "c.pem", "tls_key": "k.pem"}}, "tls_ca"),
        ({"listener": "yes"}, "tables"),
    ],
)
def test_invalid_settings_are_config_errors(dicom: dict[str, Any], message: str) -> None:
    """A mistake in [dicom] stops the node with a message naming the setting."""
    with pytest.raises(ConfigError, match=message):
        _load(dicom)


def test_open_listener_with_whitelist_is_accepted() -> None:
    """Listening on all interfaces is allowed once the calling AEs are listed."""
    cfg = _load({"listener": {"enabled": True, "host": "0.0.0.0", "allowed_calling_aes": ["CT"]}})
    assert cfg.dicom.listener.host == "0.0.0.0"
