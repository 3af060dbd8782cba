"""`fedscan demo`: data -> broker -> coordinator -> nodes -> feeder -> rounds -> table + report.

Every daemon is a separate process started with the project's own commands
(``python -m fl_protocol.broker``, ``fedscan coordinator run``, ``fedscan node run``,
``fedscan node train``), each with its own folder under ``--out`` and its log in
``--out/logs/``. The demo only reads their state from the outside (SQLite read-only, the node
API, checkpoints on disk) and never reaches into a running process. Whatever happens
(success, failure, Ctrl-C, SIGTERM) every child is stopped before ``run_demo`` returns.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from fedscan.demo import progress, setup
from fedscan.demo.config import DemoConfig
from fedscan.demo.errors import DemoError
from fedscan.demo.feeder import Feeder, schedule
from fedscan.demo.plan import DataPlan, prepare_data
from fedscan.demo.processes import Child, Supervisor, fedscan_argv, run_to_end
from fedscan.demo.results import build_results, live_predictions
from fedscan.report import ReportResults, text_table, write_report

log = logging.getLogger(__name__)

MARKER = ".fedscan-demo"
RUN_FOLDERS = ("coordinator", "nodes", "staging", "logs", "report", "keys")
BROKER_START_S = 30.0
FINISH_TIMEOUT_S = 240.0  # after the last round: nodes swap in the final model, drain inboxes
POLL_S = 1.0


class _Terminated(Exception):
    """SIGTERM to the demo: unwinds like Ctrl-C so the children are stopped."""


@dataclass
class Paths:
    out: Path

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def coordinator(self) -> Path:
        return self.out / "coordinator"

    @property
    def coordinator_state(self) -> Path:
        return self.coordinator / "state"

    def node(self, node: str) -> Path:
        return self.out / "nodes" / node

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def report(self) -> Path:
        return self.out / "report"


def prepare_out(out: Path) -> Paths:
    """Create ``out``; a folder from an earlier demo is reused (its run folders are cleared,
    the generated data and caches kept); any other non-empty folder is refused."""
    out = out.resolve()  # nodes store absolute inbox paths; so do we
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise DemoError(f"{out} exists and is not a fedscan demo folder: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("fedscan demo output; safe to delete\n")
    for name in RUN_FOLDERS:
        shutil.rmtree(out / name, ignore_errors=True)
    return Paths(out)


def start_broker(sup: Supervisor, paths: Paths) -> tuple[Child, int]:
    """``python -m fl_protocol.broker --port 0``; its port from the line it prints."""
    import sys

    child = sup.start("broker", [sys.executable, "-m", "fl_protocol.broker", "--port", "0"])
    deadline = time.monotonic() + BROKER_START_S
    while time.monotonic() < deadline:
        text = child.log_path.read_text(errors="replace") if child.log_path.exists() else ""
        m = re.search(r"listening on \S+:(\d+)", text)
        if m:
            return child, int(m.group(1))
        if child.poll() is not None:
            raise DemoError(f"the MQTT broker exited at start:\n{child.log_tail()}")
        time.sleep(0.1)
    raise DemoError("the MQTT broker did not start listening in time")


class Demo:
    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.paths = Paths(config.out)
        self.timings: dict[str, float] = {}
        self.table = progress.LiveTable(live=config.live)
        self.t0 = time.monotonic()
        self.broker_port = 0
        self.feeder: Feeder | None = None
        self.nodes: dict[str, Child] = {}
        self.coordinator: Child | None = None
        self.truth: dict[str, dict[str, str]] = {}  # node -> inbox path -> label (unlabelled)
        self.labels_needed = 0

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> int:
        c = self.config
        self.paths = prepare_out(c.out)
        t = time.monotonic()
        plan = prepare_data(c, self.paths.data)
        self.timings["data"] = time.monotonic() - t
        self._print_plan(plan)
        with Supervisor(self.paths.logs) as sup:
            t = time.monotonic()
            self._start_federation(sup, plan)
            self._watch_rounds(sup)
            self.timings["federation"] = time.monotonic() - t
            t = time.monotonic()
            self._finish(sup)
            self.timings["final model everywhere"] = time.monotonic() - t
            live = self._live_predictions()
            for child in [*self.nodes.values(), *(x for x in [self.coordinator] if x)]:
                sup.stop(child)
            sup.stop_all()  # the broker
            t = time.monotonic()
            local = self._local_only(sup) if c.local_baseline else {}
            self.timings["local-only training"] = time.monotonic() - t
        t = time.monotonic()
        results = self._evaluate(plan, local, live)
        self.timings["evaluation"] = time.monotonic() - t
        self.timings["total"] = time.monotonic() - self.t0
        results = _with_timings(results, self.timings)
        index = write_report(self.paths.report, results)
        print()
        print("The paper's table (held-out test set, percent):")
        print(text_table(results.models))
        for note in results.notes:
            print(f"  - {note}")
        print(f"\nreport: {index}")
        print(f"total {self.timings['total']:.0f} s")
        return 0

    def _print_plan(self, plan: DataPlan) -> None:
        print(f"data: {plan.source}")
        for p in plan.nodes:
            covid = sum(r.label == "covid" for r in p.labelled)
            print(f"  {p.node}: {len(p.labelled)} labelled slices ({covid} covid, "
                  f"{len({r.patient_key for r in p.labelled})} patients), "
                  f"{len(p.unlabelled)} unlabelled")  # fmt: skip
        t = plan.test_summary()
        print(f"  held-out test set: {t['slices']} slices ({t['covid']} covid) of {t['patients']} "
              "patients, never labelled at any node")  # fmt: skip

    def _start_federation(self, sup: Supervisor, plan: DataPlan) -> None:
        c, paths = self.config, self.paths
        _broker, self.broker_port = start_broker(sup, paths)
        private, public = setup.write_keys(paths.out / "keys")
        labels_needed = setup.min_labels(c, min(len(p.labelled) for p in plan.nodes))
        self.labels_needed = labels_needed
        coord_toml = setup.coordinator_toml(
            c, paths.coordinator, self.broker_port, private, labels_needed
        )
        node_tomls = {
            node: setup.node_toml(c, paths.node(node), node, self.broker_port, public)
            for node in c.node_ids
        }
        self.coordinator = sup.start(
            "coordinator", fedscan_argv("coordinator", "run", "--config", str(coord_toml))
        )
        for node, toml in node_tomls.items():
            self.nodes[node] = sup.start(node, fedscan_argv("node", "run", "--config", str(toml)))
        inboxes = {node: paths.node(node) / "inbox" for node in c.node_ids}
        drops = schedule(plan.nodes, inboxes, plan.base, c.feed_seconds, c.seed)
        label_of = {str(plan.base / r.path): r.label for p in plan.nodes for r in p.unlabelled}
        for d in drops:
            if not d.labelled:
                self.truth.setdefault(d.node, {})[str(d.dst)] = label_of[str(d.src)]
        self.feeder = Feeder(drops, paths.out / "staging")
        print(
            f"broker 127.0.0.1:{self.broker_port}, coordinator and {c.nodes} nodes started "
            f"(logs in {paths.logs}); slices arrive once every node serves the first global "
            f"model; a node trains once it has {labels_needed} labels"
        )

    def _views(self) -> tuple[list[progress.NodeView], progress.CoordinatorView]:
        coord_alive = self.coordinator is not None and self.coordinator.poll() is None
        cview, last_round = progress.coordinator_view(
            self.paths.coordinator_state, self.config.rounds, coord_alive
        )
        views = []
        feeder = self.feeder
        for node, child in self.nodes.items():
            state = self.paths.node(node) / "state"
            predicted, other, labels = progress.node_counts(state / "node.sqlite")
            delivered = feeder.delivered.get(node, {}) if feeder else {}
            totals = feeder.totals.get(node, {}) if feeder else {}
            alive = child.poll() is None
            views.append(
                progress.NodeView(
                    node=node,
                    fed=sum(delivered.values()),
                    fed_total=sum(totals.values()),
                    labels_fed=delivered.get("labelled", 0),
                    predicted=predicted,
                    other=other,
                    labels=labels,
                    model=(progress.served_version(state) if alive else None) or "-",
                    last_round=last_round.get(node),
                    alive=alive,
                )
            )
        return views, cview

    def _draw(self, phase: str, final: bool = False) -> tuple[list[progress.NodeView], Any]:
        views, cview = self._views()
        lines = progress.render(views, cview, time.monotonic() - self.t0, phase)
        (self.table.final if final else self.table.show)(lines)
        return views, cview

    def _check_children(self) -> None:
        for name, child in self.nodes.items():
            if child.poll() is not None:
                raise DemoError(
                    f"{name} exited with code {child.poll()}; its log:\n{child.log_tail()}"
                )
        if self.feeder is not None and self.feeder.error is not None:
            raise DemoError(f"the feeder failed: {self.feeder.error}")

    def _watch_rounds(self, sup: Supervisor) -> None:
        """Until the coordinator has run every round (and exited)."""
        coord = self.coordinator
        if coord is None:
            raise DemoError("no coordinator")
        deadline = time.monotonic() + self.config.timeout_s
        feeder = self.feeder
        while coord.poll() is None:
            self._check_children()
            if time.monotonic() > deadline:
                self._draw("timed out", final=True)
                raise DemoError(
                    f"the federation did not finish within {self.config.timeout_s:.0f} s; "
                    f"coordinator log:\n{coord.log_tail()}"
                )
            views, _ = self._draw("federating")
            # Slices arrive once every node serves a model, so each is predicted on arrival.
            if feeder is not None and not feeder.started and all(v.model != "-" for v in views):
                feeder.start()
            time.sleep(POLL_S)
        if feeder is not None and not feeder.started:
            feeder.start()  # the rounds ended first: deliver anyway, the nodes predict them
        self._draw("rounds done", final=True)
        if coord.poll() != 0:
            raise DemoError(f"the coordinator exited with code {coord.poll()}:\n{coord.log_tail()}")
        missing = self._incomplete_rounds()
        if missing:
            raise DemoError(f"the federation did not complete: {missing}")

    def _incomplete_rounds(self) -> str:
        from coordinator.state import State

        state = State(self.paths.coordinator_state, readonly=True)
        try:
            rounds = state.rounds()
        finally:
            state.close()
        done = [r for r in rounds if r.status == "closed" and r.version_out is not None]
        if len(done) >= self.config.rounds:
            return ""
        bad = [f"round {r.id}: {r.outcome or r.status}" for r in rounds if r not in done]
        return f"{len(done)} of {self.config.rounds} rounds produced a new model ({'; '.join(bad)})"

    def _finish(self, sup: Supervisor) -> None:
        """Wait until the feed is delivered, every file is predicted and every node serves the
        final global model."""
        from coordinator.state import State

        state = State(self.paths.coordinator_state, readonly=True)
        try:
            latest = state.latest_version()
        finally:
            state.close()
        final = "-" if latest is None else str(latest.version)
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        while True:
            self._check_children()
            views, _ = self._draw(f"nodes swap in the final global model v{final}")
            fed_all = self.feeder is not None and self.feeder.done
            ready = all(v.model == final and v.predicted + v.other >= v.fed for v in views)
            if fed_all and ready:
                self._draw("every node serves the final global model", final=True)
                return
            if time.monotonic() > deadline:
                self._draw("timed out", final=True)
                raise DemoError(f"nodes did not all serve global v{final} in time")
            time.sleep(POLL_S)

    def _live_predictions(self) -> list[dict[str, Any]]:
        dbs = {node: self.paths.node(node) / "state" / "node.sqlite" for node in self.nodes}
        return live_predictions(dbs, self.truth)

    def _local_only(self, sup: Supervisor) -> dict[str, Path]:
        """Each hospital alone: `fedscan node train` from global v0, rounds x local epochs."""
        c = self.config
        v0 = self.paths.coordinator_state / "checkpoints" / "global_v0.safetensors"
        if not v0.is_file():
            raise DemoError(f"the coordinator's initial model {v0} is missing")
        epochs = c.rounds * c.local_epochs
        print(f"\nlocal-only baselines: each hospital trains alone from global v0 for {epochs} "
              "epoch(s) (fedscan node train) ...", flush=True)  # fmt: skip
        jobs = []
        outs = {}
        for node in self.nodes:
            folder = self.paths.node(node)
            outs[node] = folder / "local-only"
            argv = fedscan_argv(
                "node", "train", "--config", str(folder / "node.toml"), "--init-weights", str(v0),
                "--epochs", str(epochs), "--out", str(outs[node]), "--no-resume", "--json",
            )  # fmt: skip
            jobs.append((f"train-{node}", argv))
        children = run_to_end(sup, jobs, timeout_s=c.timeout_s)
        from edge_node.train.job import WEIGHTS_FILE

        result: dict[str, Path] = {}
        for node, child in zip(self.nodes, children.values(), strict=True):
            weights = outs[node] / WEIGHTS_FILE
            if child.poll() != 0 or not weights.is_file():
                raise DemoError(f"local-only training of {node} failed:\n{child.log_tail()}")
            result[node] = weights
        return result

    def _evaluate(
        self, plan: DataPlan, local: dict[str, Path], live: list[dict[str, Any]]
    ) -> ReportResults:
        return build_results(
            self.config,
            plan,
            self.paths.coordinator_state,
            local,
            live,
            eval_cache=self.paths.out / "eval-cache",
            labels_needed=self.labels_needed,
            broker_port=self.broker_port,
        )


def _with_timings(results: ReportResults, timings: dict[str, float]) -> ReportResults:
    import dataclasses

    return dataclasses.replace(results, timings=dict(timings))


def run_demo(config: DemoConfig) -> int:
    """Run the demo; SIGTERM is handled like Ctrl-C (children stopped, non-zero exit)."""

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return Demo(config).run()
    except _Terminated:
        print("\nfedscan demo: terminated; every process stopped", flush=True)
        return 143
    except KeyboardInterrupt:
        print("\nfedscan demo: interrupted; every process stopped", flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
