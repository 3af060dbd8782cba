"""Errors of the wire protocol shared by the edge node and the coordinator.

ProtocolError               exit 1
├── SchemaError                      a message is malformed, or has an unknown schema version
├── IntegrityError                   a chunk / whole payload hash does not match its manifest
├── SignatureError                   a signature is missing, wrong, or from the wrong signer
├── ReplayError                      an old round / nonce / model version was replayed
├── CodecError                       an update cannot be encoded / decoded with that codec
└── TransportError          exit 7   the MQTT broker cannot be reached / refused us
"""

from __future__ import annotations


class ProtocolError(Exception):
    exit_code = 1


class SchemaError(ProtocolError):
    pass


class IntegrityError(ProtocolError):
    pass


class SignatureError(ProtocolError):
    pass


class ReplayError(ProtocolError):
    pass


class CodecError(ProtocolError):
    pass


class TransportError(ProtocolError):
    exit_code = 7
