"""The layout rules of ARCHITECTURE.md, checked on the code as it is.

- The predict-only path (``edge_node.ingest``, ``edge_node.serve`` and the DICOM sub-packages)
  never imports torch: each sub-package is imported whole in a fresh interpreter.
- Shipped packages never import ``tests`` or ``pytest`` (an installed product has neither).
- ``edge_node`` and ``coordinator`` never import each other; ``fl_protocol`` imports neither.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("edge_node", "coordinator", "export", "fl_protocol", "fedscan", "broker_config")
TORCH_FREE = ("ingest", "serve", "dicomnet", "series", "results")
TORCH = ("torch", "torchvision", "timm", "onnx")


def _imports(path: Path) -> set[str]:
    """Every module name an ``import`` or ``from ... import`` in this file names (top level or
    inside a function), relative imports resolved to nothing (this project has none)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("sub", TORCH_FREE)
def test_predict_only_subpackage_never_imports_torch(sub: str) -> None:
    """A workstation that only predicts has no torch: importing every module of
    edge_node.<sub> in a fresh interpreter leaves torch (and timm, onnx) out of sys.modules."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"import edge_node.{sub} as pkg\n"
        "for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = sorted(m for m in {TORCH!r} if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"edge_node.{sub} imports {out.stdout.strip()}"


@pytest.mark.parametrize("package", SHIPPED)
def test_shipped_code_never_imports_tests_or_pytest(package: str) -> None:
    """An installed fedscan has no tests/ folder and no pytest: no shipped module imports them."""
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for path in _modules(package)
        for name in sorted(_imports(path))
        if name.split(".")[0] in {"tests", "pytest", "_pytest"}
    ]
    assert offenders == []


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("edge_node", {"coordinator"}),
        ("coordinator", {"edge_node"}),
        ("fl_protocol", {"edge_node", "coordinator", "export", "fedscan"}),
    ],
)
def test_daemons_talk_only_through_fl_protocol(package: str, forbidden: set[str]) -> None:
    """The contract between the two daemons is fl_protocol: neither imports the other."""
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for path in _modules(package)
        for name in sorted(_imports(path))
        if name.split(".")[0] in forbidden
    ]
    assert offenders == []


# sub-package -> the edge_node parts it must not import (the data flow goes one way: ingest ->
# serve -> daemon; train and federate sit beside serve; only the CLI starts the daemon).
LAYERS = {
    "ingest": {"serve", "train", "federate", "cli", "daemon"},
    "serve": {"train", "cli", "daemon"},
    "train": {"serve", "cli", "daemon"},
    "federate": {"cli", "daemon"},
}


@pytest.mark.parametrize("sub", sorted(LAYERS))
def test_edge_node_layers_import_one_way(sub: str) -> None:
    """edge_node.<sub> imports none of the parts downstream of it (no cycles: the API takes a
    NodeView, not the daemon)."""
    forbidden = {f"edge_node.{part}" for part in LAYERS[sub]}
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for path in _modules(f"edge_node/{sub}")
        for name in sorted(_imports(path))
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert offenders == []


def test_train_modes_have_one_list() -> None:
    """fl_protocol.schemas.TRAIN_MODES is the list; node config, training job, coordinator config
    and the torch model (export.net.TrainMode) accept exactly those names."""
    from typing import get_args

    pytest.importorskip("torch")
    import coordinator.config
    import edge_node.train.job
    from export.net import TrainMode
    from fl_protocol.schemas import TRAIN_MODES

    assert get_args(TrainMode) == TRAIN_MODES
    assert edge_node.train.job.MODES is TRAIN_MODES
    assert coordinator.config.TRAIN_MODES is TRAIN_MODES
