"""Errors of the glue layer (CLI tools, demo, bench, provisioning), and the exit code table.

FedscanError            exit 1
├── MissingExtraError   exit 8   the command needs the `train` extra (torch & co.), not installed
├── DatasetError        exit 10  a dataset folder is missing or has an unknown layout
├── ProvisionError      exit 11  certificates / kits cannot be created or changed
├── BenchError          exit 14  a benchmark cannot run (missing data, missing extra)
│   └── MosquittoNotFound        (fedscan.brokers.mosquitto) no mosquitto binary
├── DemoError           exit 15  (fedscan.demo.errors) the demo failed
├── ExperimentError     exit 16  (fedscan.experiment.errors) the experiment failed
└── PretrainError       exit 17  (fedscan.pretrain.errors) pretraining failed

Every `fedscan` command exits with one code of ``EXIT_CODES`` (README, "Exit codes"); each
package's error tree (edge_node, coordinator, export, fl_protocol) uses the same numbers, so
one number never means two things.
"""

from __future__ import annotations

# code -> meaning; the single table (README "Exit codes", deploy/fedscan-node.service).
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected error (a bug: the traceback is printed), or an error with no code of its own",
    2: "usage or configuration: bad option or value, invalid node.toml / coordinator.toml, "
    "unknown architecture or strategy, state dir in use by another node, inbox missing",
    3: "the ONNX model cannot be loaded or has wrong metadata",
    4: "the local state (SQLite, checkpoints) cannot be read or written",
    5: "a label cannot be recorded (unknown class, unknown slice or frame)",
    6: "local training cannot run (no labels, the training worker failed)",
    7: "the MQTT broker cannot be reached or refused the connection",
    8: "the command needs the `train` extra, which is not installed (predict-only install)",
    9: "some inputs were not usable: `fedscan predict` files, `node label --csv` rows, "
    "`node audit --strict` files without an outcome",
    10: "a dataset folder is missing or has an unknown layout",
    11: "provisioning: certificates or kits cannot be created or changed",
    12: "export: pretrained weights not available or not matching the architecture",
    13: "export: ONNX outputs differ from torch beyond the tolerance",
    14: "a benchmark cannot run",
    15: "the demo failed (a process died, the federation did not finish in time)",
    16: "the experiment failed (bad settings, a partition that cannot be made, a failed arm)",
    17: "pretraining failed (no usable images, bad settings)",
    130: "interrupted (Ctrl-C)",
}

SOME_INPUTS_FAILED = 9  # exit code of a command that handled every input but some failed


class FedscanError(Exception):
    exit_code = 1


class MissingExtraError(FedscanError):
    exit_code = 8


class DatasetError(FedscanError):
    exit_code = 10


class ProvisionError(FedscanError):
    exit_code = 11


class BenchError(FedscanError):
    exit_code = 14
