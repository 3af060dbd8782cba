"""Errors of the model zoo and exporter.

ExportError                 exit 1
├── UnknownArchError        exit 2   name not in the registry (message lists the choices)
├── WeightsError            exit 12  pretrained weights asked for but not available / mismatched
└── ParityError             exit 13  ONNX outputs differ from torch beyond tolerance
"""

from __future__ import annotations


class ExportError(Exception):
    exit_code = 1


class UnknownArchError(ExportError):
    exit_code = 2


class WeightsError(ExportError):
    exit_code = 12


class ParityError(ExportError):
    exit_code = 13
