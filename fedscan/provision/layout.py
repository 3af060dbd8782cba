"""Where everything lives in a provisioning folder, and which participant ids are allowed.

DIR/provision.json          state: federation, broker, participants, serials, revocations
DIR/ca/                     ca.crt, ca.key (0600), crl.pem: keep this folder offline
DIR/broker/                 mosquitto.conf, acl, ca.crt, server.crt, server.key, crl.pem, data/
DIR/kits/<node>/            node.toml, tls/{ca.crt,client.crt,client.key},
                            keys/{signing.key,signing.pub,coordinator.pub}
DIR/kits/<coordinator>/     coordinator.toml, tls/..., keys/{signing.key,signing.pub},
                            keys/nodes/<node>.pub, keys/revoked.json
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fedscan.errors import ProvisionError

# Participant ids become the certificate CN, the MQTT username and client id, and a topic
# level: no MQTT wildcards (+ #), no separator (/), nothing a shell or TOML would need quoted.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def validate_id(value: str, what: str) -> str:
    if not _ID.match(value):
        raise ProvisionError(
            f"{what} {value!r}: use 1-64 letters, digits, '-' or '_' (starting with a letter "
            "or digit); it becomes a certificate CN, an MQTT username and a topic level"
        )
    return value


@dataclass(frozen=True)
class Layout:
    root: Path  # the --out folder

    @property
    def state(self) -> Path:
        return self.root / "provision.json"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.ca_dir / "ca.key"

    @property
    def ca_crl(self) -> Path:
        return self.ca_dir / "crl.pem"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def kits_dir(self) -> Path:
        return self.root / "kits"

    def kit(self, participant: str) -> Path:
        return self.kits_dir / participant

    def owned(self) -> tuple[Path, ...]:
        """What `provision --force` may delete: only what provisioning itself creates."""
        return (self.state, self.ca_dir, self.broker_dir, self.kits_dir)


@dataclass(frozen=True)
class KitFiles:
    """File names inside one participant's kit (relative to the kit folder)."""

    ca: str = "tls/ca.crt"
    cert: str = "tls/client.crt"
    key: str = "tls/client.key"
    signing_key: str = "keys/signing.key"
    signing_pub: str = "keys/signing.pub"
    coordinator_pub: str = "keys/coordinator.pub"  # node kits only
    nodes_dir: str = "keys/nodes"  # coordinator kit only: <node>.pub per trusted node
    revoked: str = "keys/revoked.json"  # coordinator kit only


KIT = KitFiles()


@dataclass(frozen=True)
class BrokerFiles:
    """File names inside DIR/broker (the folder copied to the broker host)."""

    conf: str = "mosquitto.conf"
    acl: str = "acl"
    ca: str = "ca.crt"
    cert: str = "server.crt"
    key: str = "server.key"
    crl: str = "crl.pem"
    data: str = "data"


BROKER = BrokerFiles()
