"""Render the Mosquitto ACL from ``broker_config/acl.template``.

The template has three sections, each introduced by a ``# [name]`` line: ``header`` (once),
``coordinator`` (once) and ``node`` (once per active node). Placeholders: ``{federation}``,
``{coordinator}``, ``{node}``; ids are validated first, so none can smuggle in a wildcard,
a level separator or a new line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources

from fedscan.errors import ProvisionError
from fedscan.provision.layout import validate_id

_SECTION = re.compile(r"^# \[(header|coordinator|node)\]\s*$", re.MULTILINE)


def template_text() -> str:
    return (resources.files("broker_config") / "acl.template").read_text()


def split_sections(text: str) -> dict[str, str]:
    """``{"header": ..., "coordinator": ..., "node": ...}`` (the preamble before the first
    marker documents the template itself and is dropped)."""
    parts = _SECTION.split(text)
    sections = {parts[i]: parts[i + 1].strip("\n") + "\n" for i in range(1, len(parts) - 1, 2)}
    missing = {"header", "coordinator", "node"} - set(sections)
    if missing:
        raise ProvisionError(f"acl.template lacks the sections {sorted(missing)}")
    return sections


def render_acl(
    federation: str, coordinator: str, nodes: Sequence[str], template: str | None = None
) -> str:
    validate_id(federation, "federation")
    validate_id(coordinator, "coordinator id")
    for node in nodes:
        validate_id(node, "node id")
        if node == coordinator:
            raise ProvisionError(f"node id {node!r} is the coordinator's id")
    sections = split_sections(template if template is not None else template_text())

    def fill(text: str, node: str = "") -> str:
        return (
            text.replace("{federation}", federation)
            .replace("{coordinator}", coordinator)
            .replace("{node}", node)
        )

    blocks = [fill(sections["header"]), fill(sections["coordinator"])]
    blocks += [fill(sections["node"], node) for node in sorted(nodes)]
    return "\n".join(blocks)
