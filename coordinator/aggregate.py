"""The aggregation step of a round, recomputable from durable state alone.

Inputs are all on disk: global version ``version_in`` (checkpoint), the strategy state saved
with it, and the spooled deltas of the round's accepted updates. So a coordinator killed while
aggregating simply runs this again after a restart and gets the same bytes. The new checkpoint
is written atomically first; the version row, the round close and the ``counted_in_aggregate``
marks are then committed in one transaction (``State.commit_aggregate``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.spool import SpoolFile
from coordinator.state import RoundRow, State
from coordinator.strategy import Strategy
from coordinator.validate import norm_outliers

log = logging.getLogger(__name__)

Hook = Callable[[str], None]


@dataclass(frozen=True)
class AggregateResult:
    version: int | None  # the new global version; None when the round closed without one
    counted: tuple[str, ...]  # nodes whose update is in the new version
    outliers: tuple[str, ...]  # refused at aggregation (norm far above the round's median)


def aggregate_round(
    state: State,
    rnd: RoundRow,
    strategy: Strategy,
    *,
    min_nodes: int,
    max_norm_ratio: float,
    metadata: dict[str, str],
    now: float,
    hook: Hook = lambda _phase: None,
) -> AggregateResult:
    """Aggregate round ``rnd`` (status ``aggregating``) into version ``latest + 1`` and close it."""
    accepted = state.updates(rnd.id, accepted=True)
    norms = {u.node: u.norm for u in accepted if u.norm is not None}
    outliers = norm_outliers(norms, max_norm_ratio)
    for node in outliers:
        log.warning("round %d: update of node %s refused: norm_outlier", rnd.id, node)
    counted = [u for u in accepted if u.node not in outliers]
    if len(counted) < min_nodes:
        log.warning(
            "round %d: %d updates left after outliers, quorum %d: closed without a new version",
            rnd.id,
            len(counted),
            min_nodes,
        )
        state.close_round(
            rnd.id, "no_quorum", now, outliers=dict.fromkeys(outliers, "norm_outlier")
        )
        return AggregateResult(None, (), tuple(outliers))

    global_weights, _meta = state.load_checkpoint(rnd.version_in)
    strategy.load_state_dict(state.load_strategy_state(rnd.version_in))
    sources = [SpoolFile(state.dir / str(u.spool_path), int(u.num_samples or 0)) for u in counted]
    new_weights = strategy.aggregate(global_weights, sources)
    del global_weights
    latest = state.latest_version()
    version = (latest.version if latest else rnd.version_in) + 1
    sha = state.write_checkpoint(version, new_weights, metadata, strategy.state_dict())
    del new_weights
    hook("checkpoint_written")
    nodes = tuple(u.node for u in counted)
    state.commit_aggregate(
        rnd.id,
        version,
        sha,
        counted=nodes,
        outliers=dict.fromkeys(outliers, "norm_outlier"),
        closed_at=now,
    )
    log.info(
        "round %d aggregated with %s from %d updates -> global v%d",
        rnd.id,
        strategy.name,
        len(nodes),
        version,
    )
    hook("aggregate_committed")
    return AggregateResult(version, nodes, tuple(outliers))
