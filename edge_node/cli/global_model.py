"""`fedscan node sync --config PATH` and `fedscan node rollback --config PATH`.

``sync`` fetches, verifies and installs the current global model once (same checks as the
daemon: hash, coordinator signature when configured, no rollback), exports it to
``<model_dir>/current.onnx`` (a predict-only install takes the coordinator's ONNX export of
that version instead) and exits; it never trains or publishes anything. A running daemon
picks the new file up through its model monitor. Meant for provisioning a workstation or for a
node whose daemon runs with ``[federation] enabled = false``; a daemon that follows the
federation does this by itself.

``rollback`` serves ``previous.onnx`` again (the one replaced by the last installed model).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from edge_node.config import NodeConfig, load_config
from edge_node.errors import NodeError


def sync_once(config: NodeConfig, timeout_s: float = 120.0) -> dict[str, Any]:
    """Install the current global model; returns the client's status afterwards."""
    from edge_node.federate.client import FederationClient, make_transport
    from edge_node.train.compute_service import InProcessCompute

    client = FederationClient(
        config,
        lambda _path, _version: None,
        make_transport(config, client_suffix="-sync"),
        compute=InProcessCompute(),
        participate=False,
    )
    try:
        client.connect()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            client.step(timeout=0.5)
            m = client.manifest
            installed = client.sync.state.installed_version
            if m is not None and client.sync.fetching is None and installed == m.version:
                break
            if m is not None and m.onnx is None and not client.can_train:
                raise NodeError(
                    f"global model {m.version} comes without an ONNX export and this install "
                    "cannot export the weights: upgrade the coordinator (it publishes one), "
                    "or install the 'train' extra here"
                )
        else:
            raise NodeError(f"no complete global model received within {timeout_s:.0f} s")
        return client.status()
    finally:
        client.stop()


def _sync(args: argparse.Namespace) -> int:
    config = load_config(Path(args.config))
    status = sync_once(config, args.timeout)
    print(json.dumps(status, indent=2, sort_keys=True))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from edge_node.federate.model_sync import rollback

    current = rollback(load_config(Path(args.config)))
    print(f"serving the previous model again: {current}")
    return 0


def add_parser(sub: Any) -> None:
    s = sub.add_parser("sync", help="fetch, verify and install the current global model once")
    s.add_argument("--config", required=True, help="node.toml")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
    s.set_defaults(func=_sync)

    r = sub.add_parser("rollback", help="serve previous.onnx again")
    r.add_argument("--config", required=True, help="node.toml")
    r.set_defaults(func=_rollback)
