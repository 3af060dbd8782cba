"""The node.toml that `fedscan node init` writes: it loads as is, and its commented sections
([series], [retention], the DICOM networking example) load too once uncommented (what an IT
team does first)."""

from __future__ import annotations

from pathlib import Path

from edge_node.config import default_toml, load_config


def _uncomment(text: str) -> str:
    """Uncomment every commented section (from "# [series]" on), dropping prose lines."""
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("# [series]"):
            inside = True
        if inside and line.startswith("#"):
            body = line[2:] if line.startswith("# ") else ""
            is_toml = body.startswith("[") or "=" in body.split("#")[0] or not body.strip()
            line = body if is_toml else ""
        out.append(line)
    return "\n".join(out) + "\n"


def test_init_template_loads_with_series_retention_and_dicom_off(tmp_path: Path) -> None:
    """Defaults: series tracked with the documented rule, chest only, retention on, no
    DICOM networking until the site configures it."""
    toml = tmp_path / "node.toml"
    toml.write_text(default_toml("n1"))
    cfg = load_config(toml)
    assert cfg.series.rule == "vote" and cfg.series.chest_only
    assert cfg.retention.uploads_days == 7.0 and cfg.retention.quarantine_days == 30.0
    assert not cfg.dicom.listener.enabled and not cfg.dicom.send_to.enabled


def test_uncommented_sections_are_a_valid_config(tmp_path: Path) -> None:
    """Removing the comment marks gives the documented series and retention defaults, a
    listener on 11112 that only the PACS AE may call and a sender to the PACS."""
    toml = tmp_path / "node.toml"
    toml.write_text(_uncomment(default_toml("n1")))
    cfg = load_config(toml)
    assert cfg.series.rule == "vote" and cfg.series.quiet_time_s == 30.0
    assert cfg.retention.thumbnails_days == 7.0
    assert cfg.dicom.listener.enabled and cfg.dicom.listener.port == 11112
    assert cfg.dicom.listener.allowed_calling_aes == ("PACS",) or list(
        cfg.dicom.listener.allowed_calling_aes
    ) == ["PACS"]
    assert cfg.dicom.send_to.enabled and cfg.dicom.send_to.ae_title == "PACS"
    assert cfg.dicom.send_to.port == 104
