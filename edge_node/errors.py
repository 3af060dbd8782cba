"""Errors of the edge node daemon.

    NodeError                   exit 1
    ├── ConfigError             exit 2   node.toml missing, unreadable or invalid; inbox missing;
    │                                    state dir in use by another node (pid named)
    ├── InputError              exit 1*  one input file cannot be used (quarantined, never fatal)
    │   ├── NotDicomError                not a DICOM file / cannot be parsed
    │   ├── PixelDecodeError             pixel data missing or undecodable
    │   └── SkippedInput                 valid DICOM we do not predict on (modality, SEG, ...)
    ├── ModelError              exit 3   the ONNX model cannot be loaded or has wrong metadata
    ├── StoreError              exit 4   the SQLite state cannot be opened / written
    ├── LabelError              exit 5   a label cannot be recorded (unknown class, unknown slice)
    ├── QueryError              exit 1   a page/API query parameter is out of bounds (HTTP 400)
    └── TrainingError           exit 6   local training cannot run (no labels, worker failed)

* InputError never reaches the CLI from the daemon; `fedscan predict` reports it per file and
  exits 9 (``SOME_INPUTS_FAILED``) when any input failed. A missing `train` extra is exit 8
  (fedscan.errors). The one table of exit codes is fedscan.errors.EXIT_CODES (README "Exit
  codes").
"""

from __future__ import annotations

SOME_INPUTS_FAILED = 9  # exit code: every input handled, some not usable (README "Exit codes")


class NodeError(Exception):
    exit_code = 1


class ConfigError(NodeError):
    exit_code = 2


class InputError(NodeError):
    """One input file cannot be used; ``reason`` is a short machine-greppable code."""

    exit_code = 1
    reason = "unusable"


class NotDicomError(InputError):
    reason = "not_dicom"


class PixelDecodeError(InputError):
    reason = "pixel_decode"


class SkippedInput(InputError):
    reason = "skipped"


class ModelError(NodeError):
    exit_code = 3


class StoreError(NodeError):
    exit_code = 4


class LabelError(NodeError):
    exit_code = 5


class QueryError(NodeError):
    """A page/API query (filter, window, UID) is malformed or out of bounds."""


class TrainingError(NodeError):
    exit_code = 6
