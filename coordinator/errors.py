"""Errors of the coordinator.

CoordinatorError            exit 1
├── ConfigError             exit 2   coordinator.toml missing or invalid
├── UnknownStrategyError    exit 2   aggregation strategy not registered (lists the choices)
├── UpdateRejected                   one node's update refused (logged, never fatal)
└── StateError              exit 4   the SQLite state / checkpoints cannot be read or written
"""

from __future__ import annotations


class CoordinatorError(Exception):
    exit_code = 1


class ConfigError(CoordinatorError):
    exit_code = 2


class UnknownStrategyError(CoordinatorError):
    exit_code = 2


class UpdateRejected(CoordinatorError):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class StateError(CoordinatorError):
    exit_code = 4
