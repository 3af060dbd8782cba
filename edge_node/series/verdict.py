"""Series verdict rules: the slice P(covid) of one series -> one verdict, by a named rule.

Every rule maps the slice probabilities of a series to a score in [0, 1] and compares it with
a decision threshold; a score within ``band`` of that threshold is ``uncertain`` (weak
evidence), as is a series with no usable slice. Rules register by name in ``RULES``; the node
picks one with ``[series] rule``.

    mean        mean P(covid) over the slices
    median      median P(covid)
    max         the highest slice P(covid) (one convincing slice suffices; many false alarms)
    top_k_mean  mean of the k highest P(covid) (k = min(top_k, n)): lesions show on some
                slices only, so the highest few carry the evidence without one outlier deciding
    majority    the fraction of slices at or above the model threshold, against 0.5; when
                most slices are themselves uncertain the series is uncertain (twelve slices
                at P = 0.55 with threshold 0.5 and band 0.1 are not a confident covid call)
    vote        majority of the slices outside the uncertain band (the slices that are
                themselves uncertain do not vote; none left -> uncertain)

The score of the probability rules is compared with the model's threshold (calibrated when the
model file carries ``fedscan.threshold``); ``majority`` compares a fraction with 0.5. The
choice of the default and its patient-level evaluation on UCSD COVID-CT: ``fedscan bench
series-rule`` and README "Series verdicts and DICOM results".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edge_node.errors import ConfigError

VERDICTS = ("covid", "non_covid", "uncertain")


@dataclass(frozen=True)
class SeriesVerdict:
    """What a rule decided for one series, and with which numbers."""

    verdict: str  # covid | non_covid | uncertain
    score: float | None  # the rule's score in [0, 1]; None without slices
    threshold: float  # what the score was compared with
    band: float  # |score - threshold| < band -> uncertain
    rule: str  # e.g. "top_k_mean(k=5)"
    n_slices: int  # slices the rule used


# (probs, model threshold, top_k, band) -> score; None = no slice gives evidence
Score = Callable[[np.ndarray, float, int, float], float | None]


def _mean(p: np.ndarray, _t: float, _k: int, _b: float) -> float:
    return float(p.mean())


def _median(p: np.ndarray, _t: float, _k: int, _b: float) -> float:
    return float(np.median(p))


def _max(p: np.ndarray, _t: float, _k: int, _b: float) -> float:
    return float(p.max())


def _top_k_mean(p: np.ndarray, _t: float, k: int, _b: float) -> float:
    k = max(1, min(k, len(p)))
    return float(np.sort(p)[-k:].mean())


def _majority(p: np.ndarray, t: float, _k: int, _b: float) -> float:
    return float((p >= t).mean())


def _vote(p: np.ndarray, t: float, _k: int, band: float) -> float | None:
    decided = p[np.abs(p - t) >= band]
    return None if len(decided) == 0 else float((decided >= t).mean())


@dataclass(frozen=True)
class Rule:
    name: str
    score: Score
    fraction: bool = False  # True: the score is a share of slices, compared with 0.5
    # True: a series whose slices are mostly inside the band is uncertain, whatever the score
    needs_decided_slices: bool = False


RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule("mean", _mean),
        Rule("median", _median),
        Rule("max", _max),
        Rule("top_k_mean", _top_k_mean),
        Rule("majority", _majority, fraction=True, needs_decided_slices=True),
        Rule("vote", _vote, fraction=True),
    )
}


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise ConfigError(f"unknown series rule {name!r}; choices: {sorted(RULES)}") from None


def decide(
    probs: Sequence[float] | np.ndarray,
    *,
    rule: str,
    threshold: float,
    band: float,
    top_k: int = 5,
) -> SeriesVerdict:
    """The verdict of one series from its slice P(covid) (NaN entries are ignored)."""
    r = get_rule(rule)
    p = np.asarray(probs, dtype=np.float64).ravel()
    p = p[~np.isnan(p)]
    cut = 0.5 if r.fraction else threshold
    label = f"top_k_mean(k={top_k})" if r.name == "top_k_mean" else r.name
    if len(p) == 0:
        return SeriesVerdict("uncertain", None, cut, band, label, 0)
    score = r.score(p, threshold, top_k, band)
    if score is None:  # e.g. vote with every slice within the band: no evidence either way
        return SeriesVerdict("uncertain", None, cut, band, label, len(p))
    verdict = "covid" if score >= cut else "non_covid"
    if abs(score - cut) < band:
        verdict = "uncertain"
    if r.needs_decided_slices and 2 * int((np.abs(p - threshold) < band).sum()) > len(p):
        verdict = "uncertain"  # the slices themselves are mostly uncertain: weak evidence
    return SeriesVerdict(verdict, score, cut, band, label, len(p))
