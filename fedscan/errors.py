"""Errors of the glue layer (CLI tools, demo, bench, provisioning).

FedscanError            exit 1
├── DatasetError        exit 3   a dataset folder is missing or has an unknown layout
├── ProvisionError      exit 4   certificates / kits cannot be created or changed
└── BenchError          exit 5   a benchmark cannot run (missing data, missing extra)
"""

from __future__ import annotations


class FedscanError(Exception):
    exit_code = 1


class DatasetError(FedscanError):
    exit_code = 3


class ProvisionError(FedscanError):
    exit_code = 4


class BenchError(FedscanError):
    exit_code = 5
