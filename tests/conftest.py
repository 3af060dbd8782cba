"""Suite-wide pytest options: how big the reliability suite (fault injection, fuzzing, soak) runs.

    pytest --quick        CI profile: tests marked ``slow`` are skipped, bursts, outages and
                          fuzzing budgets are small (each reliability test stays well under 30 s)
    pytest                default sizes (a little larger than --quick)
    pytest --full -m slow the long runs: 30 s broker outage, 5,000-slice soak, big fuzz budgets

Tests read the sizes from the session fixture ``reliability`` (a ``ReliabilityProfile``); the
soak's slice count can also be set with ``FEDSCAN_SOAK_SLICES``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedscan.brokers.mosquitto import MosquittoNotFound
from fedscan.samples import SAMPLES_ENV

# `fedscan export` parity and the benchmarks read their CT samples from here (in-process and in
# the subprocesses the tests start); an installed product has no default.
os.environ.setdefault(SAMPLES_ENV, str(Path(__file__).resolve().parent / "fixtures" / "dicom"))


@dataclass(frozen=True)
class ReliabilityProfile:
    name: str  # quick | default | full
    burst_files: int  # files written into an inbox around a kill -9
    labels: int  # API labels posted around a kill -9
    outage_s: float  # how long Mosquitto stays down mid-round (quick variant)
    fuzz_examples: int  # hypothesis examples per fuzz test
    soak_slices: int  # slices fed to the CI soak

    def __post_init__(self) -> None:
        if min(self.burst_files, self.labels, self.fuzz_examples, self.soak_slices) < 1:
            raise ValueError("reliability profile sizes must be >= 1")


PROFILES = {
    "quick": ReliabilityProfile("quick", 120, 60, 5.0, 25, 300),
    "default": ReliabilityProfile("default", 200, 100, 5.0, 50, 300),
    "full": ReliabilityProfile("full", 800, 300, 30.0, 400, 5000),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fedscan")
    group.addoption(
        "--quick",
        action="store_true",
        default=False,
        help="CI profile: skip tests marked slow, small fault/fuzz/soak sizes",
    )
    group.addoption(
        "--full",
        action="store_true",
        default=False,
        help="long reliability runs (30 s outage, 5,000-slice soak, big fuzz budgets)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--quick") and config.getoption("--full"):
        raise pytest.UsageError("--quick and --full exclude each other")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--quick"):
        return
    skip = pytest.mark.skip(reason="slow: skipped by --quick (run with -m slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def reliability(pytestconfig: pytest.Config) -> ReliabilityProfile:
    """Sizes for the fault, fuzz and soak tests (see the module docstring)."""
    if pytestconfig.getoption("--quick"):
        return PROFILES["quick"]
    if pytestconfig.getoption("--full"):
        return PROFILES["full"]
    return PROFILES["default"]


def soak_slices(default: int) -> int:
    """``FEDSCAN_SOAK_SLICES`` when set, else ``default``."""
    raw = os.environ.get("FEDSCAN_SOAK_SLICES")
    return int(raw) if raw else default


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> object:
    """A test or fixture that starts Mosquitto on a machine without it is skipped, not failed."""
    try:
        return (yield)
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> object:
    try:
        return (yield)
    except MosquittoNotFound as exc:
        pytest.skip(str(exc))
