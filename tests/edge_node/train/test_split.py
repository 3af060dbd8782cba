"""The patient-level split never puts one patient on both sides and is stable as labels grow."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edge_node.train.split import TRAIN, VAL, patients, side_of, split_by_patient

slices = st.lists(
    st.tuples(st.text(min_size=0, max_size=6), st.integers(0, 10_000)),  # (patient_key, slice)
    max_size=120,
)


def key(item):
    return item[0]


@settings(max_examples=200, deadline=None)
@given(slices, st.floats(0.0, 1.0), st.text(max_size=8))
def test_no_patient_on_both_sides(items, fraction, salt):
    """Random slices of random patients: the two sides share no patient and lose no slice."""
    split = split_by_patient(items, key, salt=salt, val_fraction=fraction)
    assert not patients(split.train, key) & patients(split.val, key)
    assert sorted(split.train + split.val) == sorted(items)


@settings(max_examples=100, deadline=None)
@given(slices, slices, st.floats(0.05, 0.95))
def test_adding_labels_never_moves_a_slice(first, more, fraction):
    """Labels arrive in two batches: every slice of the first batch stays on its side."""
    before = split_by_patient(first, key, salt="fed", val_fraction=fraction)
    after = split_by_patient(first + more, key, salt="fed", val_fraction=fraction)
    assert set(before.train) <= set(after.train)
    assert set(before.val) <= set(after.val)


def test_missing_patient_key_goes_to_train():
    """Without a patient key a slice cannot be grouped, so it never enters validation."""
    assert side_of(None, salt="x", val_fraction=1.0) == TRAIN
    assert side_of("", salt="x", val_fraction=1.0) == TRAIN
    assert side_of("p", salt="x", val_fraction=1.0) == VAL
    assert side_of("p", salt="x", val_fraction=0.0) == TRAIN


def test_fraction_of_patients_and_salt_dependence():
    """About val_fraction of 2000 patients go to val; another salt gives another split."""
    keys = [f"patient-{i}" for i in range(2000)]
    a = [side_of(k, salt="fed-a", val_fraction=0.2) for k in keys]
    b = [side_of(k, salt="fed-b", val_fraction=0.2) for k in keys]
    assert 0.17 < a.count(VAL) / len(keys) < 0.23
    assert a != b
    assert a == [side_of(k, salt="fed-a", val_fraction=0.2) for k in keys]  # deterministic
