"""`fedscan node init DIR` and `fedscan node run --config PATH [--model M.onnx] [--api-port N]`.

The daemon module (onnxruntime, watchdog, uvicorn) is imported only when `run` runs, so that
`fedscan node --help` and the other node commands stay light.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from edge_node.config import default_toml, load_config
from edge_node.errors import ConfigError
from edge_node.file_modes import PRIVATE_DIR, PRIVATE_FILE, set_private_umask, tighten

log = logging.getLogger(__name__)

NODE_FOLDERS = ("inbox", "state", "quarantine", "models")


def init_node(folder: Path, node_id: str = "node1", *, force: bool = False) -> Path:
    """Write ``folder/node.toml`` with working defaults and create its folders."""
    folder = Path(folder)
    toml = folder / "node.toml"
    if toml.exists() and not force:
        raise ConfigError(f"{toml} already exists (use --force to overwrite)")
    folder.mkdir(parents=True, exist_ok=True)
    toml.write_text(default_toml(node_id))
    tighten(toml, PRIVATE_FILE)  # it will hold the API token (and keys' paths): owner-only
    load_config(toml)  # the file we write must load
    for name in NODE_FOLDERS:
        (folder / name).mkdir(mode=PRIVATE_DIR, exist_ok=True)
    return toml


def _init(args: argparse.Namespace) -> int:
    set_private_umask()  # node.toml and the folders: owner-only (file_modes)
    toml = init_node(Path(args.dir), args.node_id, force=args.force)
    print(
        f"wrote {toml}; put a model at {toml.parent / 'models' / 'current.onnx'} "
        f"and run: fedscan node run --config {toml}"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    set_private_umask()  # state, uploads, quarantine hold patient data (file_modes)
    overrides: dict[str, dict[str, Any]] = {
        # CLI paths are relative to the current directory, not to the TOML file.
        "inference": {"model": str(Path(args.model).resolve()) if args.model else None},
        "api": {"port": args.api_port},
    }
    config = load_config(Path(args.config), overrides)
    from edge_node.daemon import Daemon

    return Daemon(config).run()


def add_parser(sub: Any) -> None:
    p = sub.add_parser("init", help="write DIR/node.toml with defaults and create folders")
    p.add_argument("dir", help="node folder (inbox, state, quarantine and models go inside)")
    p.add_argument("--node-id", default="node1", help="node id (letters, digits, - and _)")
    p.add_argument("--force", action="store_true", help="overwrite an existing node.toml")
    p.set_defaults(func=_init)

    r = sub.add_parser("run", help="run the edge node daemon (SIGTERM drains and exits 0)")
    r.add_argument("--config", required=True, help="node.toml")
    r.add_argument("--model", help="ONNX model to serve (default <model_dir>/current.onnx)")
    r.add_argument("--api-port", type=int, help="API port (0 = any free port)")
    r.set_defaults(func=_run)
