"""What a report shows: the evaluated models, the rounds, the configuration, and notes.

Plain frozen dataclasses with ``to_dict`` / ``from_dict``, so the demo can write them to
``results.json`` and the report (or a later re-rendering) can read them back. Metrics and ROC
curves are ``fl_protocol.metrics`` objects: the same formulas as everywhere else in fedscan.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fl_protocol.metrics import Metrics, RocCurve

MODEL_KINDS = ("local", "global", "centralized", "other")


@dataclass(frozen=True)
class ModelEval:
    """One model evaluated on the held-out test set (one row of the paper's table)."""

    name: str  # "hospital-1 local", "global v3"
    kind: str  # local | global | centralized | other
    metrics: Metrics
    roc: RocCurve | None = None  # None when no scores (or one class only)
    node: str | None = None  # the hospital a local model belongs to
    description: str = ""  # how the model was made (shown under the table)
    # calibration on the test set: "ece" (P(covid) as the softmax gives it), "reliability"
    # (bins: mean_p, frac_covid, n), and with an operating point fitted on validation data
    # ("operating_point": temperature / threshold / uncertain_band ...) "ece_calibrated",
    # "reliability_calibrated", "calibrated" (metrics at that threshold) and "uncertain"
    # (test slices inside the band); None when not measured
    calibration: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a model needs a name")
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, not {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "node": self.node,
            "description": self.description,
            "metrics": self.metrics.to_dict(),
            "roc": None if self.roc is None else self.roc.to_dict(),
            "calibration": None if self.calibration is None else dict(self.calibration),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelEval:
        roc = d.get("roc")
        return cls(
            name=str(d["name"]),
            kind=str(d["kind"]),
            node=d.get("node"),
            description=str(d.get("description", "")),
            metrics=Metrics.from_dict(d["metrics"]),
            calibration=d.get("calibration"),
            roc=None
            if roc is None
            else RocCurve(
                fpr=tuple(float(v) for v in roc["fpr"]),
                tpr=tuple(float(v) for v in roc["tpr"]),
                thresholds=tuple(float(v) for v in roc["thresholds"]),
            ),
        )


@dataclass(frozen=True)
class RoundPoint:
    """One federated round: the global model it produced and how good that model is."""

    round: int  # 0 = the initial global model (before any round)
    version: int  # global version after this round
    test_accuracy: float | None  # that version on the held-out test set
    reported: Mapping[str, float] = field(default_factory=dict)  # node -> local-val accuracy
    weighted_reported: float | None = None  # coordinator's weighted mean of ``reported``
    accepted: int = 0  # node updates aggregated into ``version``

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "version": self.version,
            "test_accuracy": self.test_accuracy,
            "reported": dict(self.reported),
            "weighted_reported": self.weighted_reported,
            "accepted": self.accepted,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundPoint:
        return cls(
            round=int(d["round"]),
            version=int(d["version"]),
            test_accuracy=d.get("test_accuracy"),
            reported={str(k): float(v) for k, v in dict(d.get("reported") or {}).items()},
            weighted_reported=d.get("weighted_reported"),
            accepted=int(d.get("accepted", 0)),
        )


@dataclass(frozen=True)
class ReportResults:
    """Everything ``write_report`` renders."""

    title: str
    models: Sequence[ModelEval]  # table rows, in order
    rounds: Sequence[RoundPoint] = ()
    config: Mapping[str, Any] = field(default_factory=dict)  # shown as a key/value table
    test_set: Mapping[str, Any] = field(default_factory=dict)  # n, covid, non_covid, patients
    init: str = "random"  # where the initial global weights came from (random | hub | file)
    notes: Sequence[str] = ()  # sentences shown under the table (what "local" means, ...)
    timings: Mapping[str, float] = field(default_factory=dict)  # phase -> seconds
    extra_tables: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)
    generated_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("model names in a report must be unique")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "fedscan.report/1",
            "title": self.title,
            "generated_at": self.generated_at,
            "init": self.init,
            "config": dict(self.config),
            "test_set": dict(self.test_set),
            "notes": list(self.notes),
            "timings": dict(self.timings),
            "models": [m.to_dict() for m in self.models],
            "rounds": [r.to_dict() for r in self.rounds],
            "extra_tables": {k: [dict(r) for r in v] for k, v in self.extra_tables.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReportResults:
        return cls(
            title=str(d["title"]),
            generated_at=float(d.get("generated_at", time.time())),
            init=str(d.get("init", "random")),
            config=dict(d.get("config") or {}),
            test_set=dict(d.get("test_set") or {}),
            notes=tuple(str(n) for n in d.get("notes") or ()),
            timings={str(k): float(v) for k, v in dict(d.get("timings") or {}).items()},
            models=tuple(ModelEval.from_dict(m) for m in d.get("models") or ()),
            rounds=tuple(RoundPoint.from_dict(r) for r in d.get("rounds") or ()),
            extra_tables={
                str(k): tuple(dict(r) for r in v)
                for k, v in dict(d.get("extra_tables") or {}).items()
            },
        )
