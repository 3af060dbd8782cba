"""``DIR/provision.json``: what was issued, so that `add-node`, `revoke` and `crl` can work on
an existing federation without re-reading every certificate. Never holds a secret."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedscan.errors import ProvisionError
from fedscan.provision.files import write_text
from fedscan.provision.layout import validate_id

SCHEMA = "fedscan.provision/1"


@dataclass(frozen=True)
class Participant:
    role: str  # "coordinator" | "node"
    cert_serial: str  # hex serial of the current client certificate
    not_after: str  # ISO 8601 expiry of that certificate
    signing_key_sha256: str  # fingerprint of the Ed25519 public key (signing_keys.fingerprint)

    def __post_init__(self) -> None:
        if self.role not in ("coordinator", "node"):
            raise ProvisionError(f"unknown participant role {self.role!r}")


@dataclass(frozen=True)
class Revocation:
    cert_serial: str  # hex serial put on the CRL
    signing_key_sha256: str  # the coordinator must stop trusting this key
    revoked_at: str  # ISO 8601
    reason: str  # a fedscan.provision.ca.REASONS key


@dataclass(frozen=True)
class ProvisionState:
    federation: str  # topic prefix fl/<federation>/
    coordinator: str  # the coordinator's participant id (certificate CN)
    broker_host: str  # host name nodes dial; in the broker certificate's SAN
    broker_port: int  # TLS listener port (8883 by convention)
    broker_install_dir: str  # where DIR/broker is installed on the broker host (conf paths)
    days: int  # default certificate lifetime for new certificates
    crl_days: int  # CRL validity: re-run `provision crl` before it lapses
    crl_number: int  # monotonically increasing CRL number
    participants: dict[str, Participant] = field(default_factory=dict)
    revoked: dict[str, Revocation] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_id(self.federation, "federation")
        validate_id(self.coordinator, "coordinator id")
        if not 0 < self.broker_port < 65536:
            raise ProvisionError(f"broker port {self.broker_port} is not a TCP port")
        if self.days < 1 or self.crl_days < 1:
            raise ProvisionError("certificate and CRL lifetimes must be at least one day")

    @property
    def nodes(self) -> list[str]:
        """Active (not revoked) nodes, sorted."""
        return sorted(p for p, v in self.participants.items() if v.role == "node")

    def with_changes(self, **changes: Any) -> ProvisionState:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        data = {"schema": SCHEMA, **dataclasses.asdict(self)}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ProvisionState:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProvisionError(f"provision.json is not JSON: {exc}") from exc
        if not isinstance(data, dict) or data.pop("schema", None) != SCHEMA:
            raise ProvisionError(f"provision.json: expected schema {SCHEMA!r}")
        try:
            data["participants"] = {
                k: Participant(**v) for k, v in data.get("participants", {}).items()
            }
            data["revoked"] = {k: Revocation(**v) for k, v in data.get("revoked", {}).items()}
            return cls(**data)
        except TypeError as exc:
            raise ProvisionError(f"provision.json: {exc}") from exc


def load_state(path: Path) -> ProvisionState:
    if not path.exists():
        raise ProvisionError(f"{path} not found: run `fedscan provision --federation ...` first")
    return ProvisionState.from_json(path.read_text())


def save_state(path: Path, state: ProvisionState) -> None:
    write_text(path, state.to_json())
