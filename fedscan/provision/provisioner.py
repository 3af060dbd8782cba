"""Create a federation's PKI, broker files and kits (`fedscan provision`), and add a node to
an existing one (`fedscan provision add-node`).

An existing provisioning folder is never overwritten silently: re-running `provision` on a
folder that already holds a CA is refused unless ``force`` is given, because a new CA
invalidates every kit already deployed.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from fedscan.errors import ProvisionError
from fedscan.provision.broker import (
    write_acl,
    write_broker_conf,
    write_crl,
    write_server_files,
)
from fedscan.provision.ca import CertificateAuthority, cert_pem, key_pem, serial_hex
from fedscan.provision.files import PRIVATE, PRIVATE_DIR, make_dir, write_bytes
from fedscan.provision.kits import (
    refresh_coordinator_files,
    write_coordinator_kit,
    write_node_kit,
)
from fedscan.provision.layout import Layout, validate_id
from fedscan.provision.outcome import Outcome, reload_step
from fedscan.provision.state import Participant, ProvisionState, load_state, save_state

log = logging.getLogger(__name__)

DEFAULT_PORT = 8883
DEFAULT_DAYS = 365  # client / server certificates
DEFAULT_CRL_DAYS = 365  # an expired CRL locks everyone out: renew with `provision crl`
CA_MIN_DAYS = 3650  # the CA outlives several generations of participant certificates


def _check_nodes(nodes: Sequence[str], coordinator: str) -> list[str]:
    if not nodes:
        raise ProvisionError("at least one node is needed (--nodes a,b,c)")
    for node in nodes:
        validate_id(node, "node id")
        if node == coordinator:
            raise ProvisionError(f"node id {node!r} is the coordinator's id")
    if len(set(nodes)) != len(nodes):
        raise ProvisionError("node ids must be unique")
    return list(nodes)


def _refuse_existing(layout: Layout, force: bool) -> None:
    existing = [p for p in layout.owned() if p.exists()]
    if not existing:
        return
    if not force:
        raise ProvisionError(
            f"{layout.root} already holds a provisioned federation ({existing[0].name}); "
            "a new CA would invalidate every deployed kit. Use add-node / revoke, or --force "
            "to start over"
        )
    log.warning("--force: deleting the existing CA, broker files and kits in %s", layout.root)
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _issue_node(
    layout: Layout, state: ProvisionState, ca: CertificateAuthority, node: str, days: int
) -> ProvisionState:
    issued = ca.issue_client(node, "node", days)
    key_fp = write_node_kit(layout, state, ca, node, issued)
    participant = Participant(
        role="node",
        cert_serial=serial_hex(issued.cert),
        not_after=issued.cert.not_valid_after_utc.isoformat(),
        signing_key_sha256=key_fp,
    )
    return state.with_changes(participants={**state.participants, node: participant})


def provision(
    out: Path,
    federation: str,
    nodes: Sequence[str],
    *,
    broker_host: str = "localhost",
    broker_port: int = DEFAULT_PORT,
    broker_install_dir: str | None = None,
    coordinator: str = "coordinator",
    days: int = DEFAULT_DAYS,
    crl_days: int = DEFAULT_CRL_DAYS,
    force: bool = False,
) -> Outcome:
    """Create the CA, broker certificate and config, ACL, empty CRL and one kit per participant
    under ``out``. Raises ProvisionError (nothing half-written is left behind)."""
    layout = Layout(Path(out).resolve())
    if not broker_host or any(c.isspace() or c in "/@" for c in broker_host):
        raise ProvisionError(f"invalid broker host {broker_host!r}")
    install_dir = broker_install_dir or str(layout.broker_dir)
    state = ProvisionState(
        federation=federation,
        coordinator=coordinator,
        broker_host=broker_host,
        broker_port=broker_port,
        broker_install_dir=install_dir,
        days=days,
        crl_days=crl_days,
        crl_number=1,
    )
    node_list = _check_nodes(nodes, coordinator)
    _refuse_existing(layout, force)
    layout.root.mkdir(parents=True, exist_ok=True)
    try:
        ca = CertificateAuthority.create(federation, max(days, CA_MIN_DAYS))
        make_dir(layout.ca_dir, PRIVATE_DIR)
        write_bytes(layout.ca_cert, cert_pem(ca.cert))
        write_bytes(layout.ca_key, key_pem(ca.key), PRIVATE)

        hosts = [broker_host, "localhost", "127.0.0.1"]
        write_server_files(layout, ca, ca.issue_server(hosts, days))

        issued = ca.issue_client(coordinator, "coordinator", days)
        coord_fp = write_coordinator_kit(layout, state, ca, issued)
        state = state.with_changes(
            participants={
                coordinator: Participant(
                    role="coordinator",
                    cert_serial=serial_hex(issued.cert),
                    not_after=issued.cert.not_valid_after_utc.isoformat(),
                    signing_key_sha256=coord_fp,
                )
            }
        )
        for node in node_list:
            state = _issue_node(layout, state, ca, node, days)

        write_crl(layout, state, ca)
        write_acl(layout, state)
        write_broker_conf(layout, state)
        refresh_coordinator_files(layout, state)
        save_state(layout.state, state)  # last: its presence means "complete"
    except BaseException:
        for path in layout.owned():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        raise
    log.info("provisioned federation %s: coordinator %s, nodes %s", federation, coordinator, nodes)
    return Outcome(
        summary=(
            f"federation {federation!r} provisioned in {layout.root}: CA, broker "
            f"({broker_host}:{broker_port}), coordinator {coordinator!r}, "
            f"nodes {', '.join(node_list)}"
        ),
        next_steps=(
            f"keep {layout.ca_dir} (the CA key) offline; it is never part of a kit",
            f"install {layout.broker_dir} as {install_dir} on the broker host (readable by the "
            f"mosquitto user) and run `mosquitto -c {install_dir}/mosquitto.conf`",
            f"copy {layout.kits_dir}/<participant>/ to each site; start with "
            "`fedscan node run --config node.toml` / the coordinator with coordinator.toml",
        ),
    )


def add_node(out: Path, node: str, *, days: int | None = None) -> Outcome:
    """Issue a kit for a new node, trust its signing key, and grant it its ACL rights."""
    layout = Layout(Path(out).resolve())
    state = load_state(layout.state)
    validate_id(node, "node id")
    if node == state.coordinator or node in state.participants:
        raise ProvisionError(f"{node!r} is already a participant of {state.federation!r}")
    if node in state.revoked:
        raise ProvisionError(
            f"{node!r} was revoked; ids are not reused (the coordinator refuses it): pick "
            "another id"
        )
    ca = CertificateAuthority.load(layout.ca_cert, layout.ca_key)
    state = _issue_node(layout, state, ca, node, days or state.days)
    write_acl(layout, state)
    refresh_coordinator_files(layout, state)
    save_state(layout.state, state)
    log.info("added node %s to federation %s", node, state.federation)
    coord_kit = layout.kit(state.coordinator)
    return Outcome(
        summary=f"node {node!r} added to {state.federation!r}: kit in {layout.kit(node)}",
        next_steps=(
            f"copy {layout.kit(node)}/ to the new site",
            reload_step(state.broker_install_dir, f"{layout.broker_dir}/acl"),
            f"copy {coord_kit}/keys/nodes/{node}.pub and {coord_kit}/coordinator.toml to the "
            "coordinator and restart it",
        ),
    )
