"""One node's federation side as its own process, for the round benchmark.

    python -m fedscan.bench.federation.node --config node.toml

Runs what a `fedscan node run` daemon runs for ``[federation] enabled``: the real
``edge_node.federate.client.FederationClient`` over a ``PahoTransport`` to the configured broker,
with the real low-priority compute worker (``WorkerCompute``: torch pre-imported, ONNX export
and ``train_once`` in a child process), and every installed global model swapped into a
``ModelHolder`` as the daemon's inference path does. Without the watcher, pipeline and API:
the round benchmark measures the federation, and the daemon in this tree does not start the
federation client yet. Logs go to stdout with timestamps (the benchmark reads them); SIGTERM
stops it cleanly.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="a node's federation client (benchmark helper)")
    p.add_argument("--config", type=Path, required=True, help="node.toml")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from edge_node.config import load_config
    from edge_node.federate.client import FederationClient
    from edge_node.serve.inference import ModelHolder

    config = load_config(args.config)
    holder = ModelHolder(intra_op_threads=config.inference.intra_op_threads)
    log = logging.getLogger("fedscan.bench.federation.node")

    def on_new_model(path: Path, version: int) -> None:
        holder.swap(path)
        log.info("serving global model %d", version)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_a: stop.set())
    signal.signal(signal.SIGINT, lambda *_a: stop.set())
    client = FederationClient(config, on_new_model)
    client.start()
    stop.wait()
    client.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
