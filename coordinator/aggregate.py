"""The aggregation step of a round, recomputable from durable state alone.

Inputs are all on disk: global version ``version_in`` (checkpoint), the strategy state saved
with it, and the spooled deltas of the round's accepted updates. So a coordinator killed while
aggregating simply runs this again after a restart and gets the same bytes. The new checkpoint
is written atomically first; the version row, the round close and the ``counted_in_aggregate``
marks are then committed in one transaction (``State.commit_aggregate``).

Before anything is folded, :func:`screen_updates` decides what each accepted update weighs and
which are refused: sample claims are capped so that no node holds more than
``validation.max_weight_share`` of the weight (``strategy_utils.capped_weights``), and an update
whose weighted contribution (share x norm) is far above the other nodes' is refused as
``norm_outlier`` (``validate.contribution_outliers``). The round machine runs the same screening
to decide whether the quorum is met, so a refused update never ends a round that the others
can still complete. A result with NaN or inf (it cannot pass the checks, but a strategy could
still overflow) is never written: the round closes without a new version (``not_finite``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.spool import SpoolFile
from coordinator.state import RoundRow, State, UpdateRow
from coordinator.strategy import Strategy
from coordinator.strategy.utils import capped_weights
from coordinator.validate import contribution_outliers

log = logging.getLogger(__name__)

Hook = Callable[[str], None]


@dataclass(frozen=True)
class AggregateResult:
    version: int | None  # the new global version; None when the round closed without one
    counted: tuple[str, ...]  # nodes whose update is in the new version
    outliers: tuple[str, ...]  # refused at aggregation (weighted contribution out of line)


DEFAULT_MAX_WEIGHT_SHARE = 0.5  # ValidationConfig.max_weight_share's default


@dataclass(frozen=True)
class Screening:
    """What the accepted updates of a round weigh, and which of them are refused."""

    weights: dict[str, int]  # node -> aggregation weight (its capped sample claim)
    outliers: tuple[str, ...]  # refused: weighted contribution out of line (norm_outlier)
    contributions: dict[str, float]  # node -> weight share x delta norm (before refusals)

    @property
    def counted(self) -> int:
        return len(self.weights)


def screen_updates(
    accepted: Sequence[UpdateRow],
    *,
    weighted: bool,
    max_weight_share: float,
    max_norm_ratio: float,
) -> Screening:
    """Weights and refusals for ``accepted`` (deterministic: no dependence on arrival order).

    ``weighted``: the strategy weighs nodes by their sample claims (FedAvg and friends);
    otherwise every node has the same weight and the cap has nothing to cut."""
    claims = {u.node: float(u.num_samples or 0) if weighted else 1.0 for u in accepted}
    nodes = list(claims)
    capped = capped_weights([claims[n] for n in nodes], max_weight_share)
    total = sum(capped) or 1.0
    norms = {u.node: float(u.norm or 0.0) for u in accepted}
    contributions = {n: w / total * norms[n] for n, w in zip(nodes, capped, strict=True)}
    outliers = contribution_outliers(contributions, max_norm_ratio)
    kept = [n for n in nodes if n not in outliers]
    # whole samples, rounded down: a share only shrinks, the cap holds
    weights = [
        max(1, math.floor(w + 1e-9))
        for w in capped_weights([claims[n] for n in kept], max_weight_share)
    ]
    return Screening(dict(zip(kept, weights, strict=True)), tuple(outliers), contributions)


def _all_finite(weights: dict[str, np.ndarray]) -> bool:
    return all(
        bool(np.isfinite(v).all()) for v in weights.values() if np.issubdtype(v.dtype, np.inexact)
    )


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
    max_weight_share: float = DEFAULT_MAX_WEIGHT_SHARE,
) -> AggregateResult:
    """Aggregate round ``rnd`` (status ``aggregating``) into version ``latest + 1`` and close it."""
    accepted = state.updates(rnd.id, accepted=True)
    screen = screen_updates(
        accepted,
        weighted=strategy.weighted,
        max_weight_share=max_weight_share,
        max_norm_ratio=max_norm_ratio,
    )
    outliers = screen.outliers
    for node in outliers:
        others = sorted(v for n, v in screen.contributions.items() if n != node)
        log.warning(
            "round %d: update of node %s refused: norm_outlier (weighted contribution %.4g,"
            " others %s, limit %s x their median)",
            rnd.id,
            node,
            screen.contributions[node],
            ", ".join(f"{v:.4g}" for v in others),
            max_norm_ratio,
        )
    counted = [u for u in accepted if u.node in screen.weights]
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
    claimed = {u.node: int(u.num_samples or 0) for u in counted}
    if strategy.weighted and any(screen.weights[n] < claimed[n] for n in claimed):
        log.warning(
            "round %d: sample claims capped at %.0f (claims %s): no node above %.0f%% of the"
            " weight",
            rnd.id,
            max(screen.weights.values()),
            ", ".join(f"{n}={c}" for n, c in sorted(claimed.items())),
            100 * max_weight_share,
        )
    sources = [SpoolFile(state.dir / str(u.spool_path), screen.weights[u.node]) for u in counted]
    new_weights = strategy.aggregate(global_weights, sources)
    del global_weights
    if not _all_finite(new_weights):
        log.error("round %d: the aggregate holds NaN or inf: closed without a new version", rnd.id)
        state.close_round(
            rnd.id, "not_finite", now, outliers=dict.fromkeys(outliers, "norm_outlier")
        )
        return AggregateResult(None, (), tuple(outliers))
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
