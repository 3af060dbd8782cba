"""Patient-level split of the labelled slices into local train and local validation.

Each patient goes to one side by a hash of ``salt + patient_key`` (the salt is federation-wide,
the federation id by default), so no patient is on both sides, and a patient's side never
changes as more labels arrive: adding labels only adds slices to the side their patient is on.
Slices without a patient key cannot be grouped safely and always go to train (they can then
never leak into validation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

TRAIN = "train"
VAL = "val"


def patient_unit(patient_key: str, salt: str) -> float:
    """A stable number in [0, 1) for a patient: the first 64 bits of sha256(salt, key)."""
    digest = hashlib.sha256(f"{salt}\x00{patient_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def side_of(patient_key: str | None, *, salt: str, val_fraction: float) -> str:
    """``"val"`` for about ``val_fraction`` of patients, ``"train"`` for the rest."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError("val_fraction must be in [0, 1]")
    if not patient_key:
        return TRAIN
    return VAL if patient_unit(patient_key, salt) < val_fraction else TRAIN


@dataclass(frozen=True)
class Split(Generic[T]):
    train: tuple[T, ...]
    val: tuple[T, ...]


def split_by_patient(
    items: Iterable[T],
    patient_key: Callable[[T], str | None],
    *,
    salt: str,
    val_fraction: float,
) -> Split[T]:
    """Partition ``items`` (order kept within each side) by their patient's side."""
    train: list[T] = []
    val: list[T] = []
    for item in items:
        side = side_of(patient_key(item), salt=salt, val_fraction=val_fraction)
        (val if side == VAL else train).append(item)
    return Split(train=tuple(train), val=tuple(val))


def patients(items: Sequence[T], patient_key: Callable[[T], str | None]) -> set[str]:
    """The distinct non-empty patient keys of ``items``."""
    return {k for k in (patient_key(i) for i in items) if k}
