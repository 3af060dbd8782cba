"""The demo's folders and configuration files: one coordinator, one folder per hospital.

Each node folder comes from ``fedscan node init`` (``edge_node.cli.daemon.init_node``) and its
``node.toml`` is then edited: federation on (the local broker's port), the API on a free port,
one thread each (two cores for everything), the demo's training settings. The coordinator's
file starts from ``coordinator.config.default_toml`` with the broker, model and rounds set.
The coordinator signs every global manifest with a fresh Ed25519 key and the nodes check it.
Both files are loaded back with their own loaders, so a bad edit fails here, not in a child.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from fedscan.demo.config import DemoConfig
from fl_protocol.config_types import dump_toml

FEDERATION = "demo"


def write_keys(folder: Path) -> tuple[Path, Path]:
    """(coordinator private key, its public key) for signed global manifests."""
    from fl_protocol.signing import generate_keypair, save_private_key, save_public_key

    folder.mkdir(parents=True, exist_ok=True)
    key, public_key = generate_keypair()
    private, public = folder / "coordinator.ed25519", folder / "coordinator.ed25519.pub"
    save_private_key(key, private)
    save_public_key(public_key, public)
    return private, public


def min_labels(config: DemoConfig, smallest_share: int) -> int:
    """Labels a node needs before it trains in a round: by default the smallest hospital's whole
    share, so the federation trains on the same labels as the local-only baselines (which
    train afterwards on every label); with a third of it, as before, the first rounds trained
    on a third of the data and the comparison was tilted against FedAvg."""
    if config.min_labels is not None:
        return config.min_labels
    return max(4, smallest_share)


def texture_dim(config: DemoConfig) -> int:
    """The global model's texture input width (0: none)."""
    from edge_node.ingest.texture import TEXTURE_DIM

    return TEXTURE_DIM if config.texture else 0


def coordinator_toml(
    config: DemoConfig, folder: Path, broker_port: int, signing_key: Path, labels_needed: int
) -> Path:
    from coordinator.config import default_toml, load_config

    folder.mkdir(parents=True, exist_ok=True)
    raw = tomllib.loads(default_toml(FEDERATION))
    raw["signing_key"] = str(signing_key)
    raw["broker"] = {"url": f"mqtt://127.0.0.1:{broker_port}", "keepalive_s": 30}
    raw["model"].update(
        arch=config.arch, init="random", seed=config.seed, texture_dim=texture_dim(config)
    )
    raw["rounds"].update(
        num_rounds=config.rounds,
        min_nodes=config.nodes,
        expected_nodes=config.node_ids,
        round_timeout_s=config.round_timeout_s,
        strategy="fedavg",
        codec="fp16",
        local_epochs=config.local_epochs,
        lr=config.lr,
        lr_schedule=config.lr_schedule,
        batch_size=config.batch_size,
        min_labels=labels_needed,
        seed=config.seed,
    )
    path = folder / "coordinator.toml"
    path.write_text("# written by fedscan demo\n" + dump_toml(raw))
    load_config(path)
    return path


def node_toml(
    config: DemoConfig, folder: Path, node_id: str, broker_port: int, coordinator_key: Path
) -> Path:
    from edge_node.cli.daemon import init_node
    from edge_node.config import load_config

    path = init_node(folder, node_id, force=True)
    raw = tomllib.loads(path.read_text())
    raw["api"]["port"] = 0  # a free port, written to state/api.port
    raw["inference"]["intra_op_threads"] = 1
    raw["training"].update(
        arch=config.arch,
        texture_features=config.texture,
        epochs=config.rounds * config.local_epochs,  # `fedscan node train` (local-only run)
        lr=config.lr,
        lr_schedule=config.lr_schedule,  # the local-only baseline (`fedscan node train`)
        head_lr_mult=config.head_lr_mult,
        batch_size=config.batch_size,
        seed=config.seed,
        early_stopping_patience=0,  # the whole budget, like a round's fixed epochs
        torch_threads=1,
    )
    raw["federation"] = {
        "enabled": True,
        "federation": FEDERATION,
        "broker": f"mqtt://127.0.0.1:{broker_port}",
        "coordinator_public_key": str(coordinator_key),
        "codec": "fp16",
    }
    path.write_text(f"# fedscan node init + edits by fedscan demo\n{dump_toml(raw)}")
    load_config(path)
    return path
