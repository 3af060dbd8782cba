"""Metrics agree with scikit-learn, including the degenerate cases the coordinator will meet."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from fl_protocol.metrics import (
    Metrics,
    classification_metrics,
    from_confusion,
    pooled,
    roc_auc,
    roc_curve,
    weighted_average,
)


def sklearn_reference(y_true, y_pred, y_score=None):
    t = np.asarray(y_true)
    p = np.asarray(y_pred)
    cm = skm.confusion_matrix(t, p, labels=[0, 1])
    tn, fp = cm[0]
    ref = {
        "accuracy": skm.accuracy_score(t, p) if t.size else 0.0,
        "precision": skm.precision_score(t, p, labels=[0, 1], zero_division=0),
        "recall": skm.recall_score(t, p, labels=[0, 1], zero_division=0),
        "f1": skm.f1_score(t, p, labels=[0, 1], zero_division=0),
        # sklearn has no specificity: it is the recall of the negative class
        "specificity": skm.recall_score(t, p, labels=[0, 1], pos_label=0, zero_division=0),
        "confusion": cm.tolist(),
        "tn_fp": (int(tn), int(fp)),
    }
    if y_score is not None and len(set(t.tolist())) == 2:
        ref["auc"] = skm.roc_auc_score(t, y_score)
    else:
        ref["auc"] = None
    return ref


def assert_matches_sklearn(y_true, y_pred, y_score=None):
    m = classification_metrics(y_true, y_pred, y_score)
    ref = sklearn_reference(y_true, y_pred, y_score)
    for name in ("accuracy", "precision", "recall", "specificity", "f1"):
        assert getattr(m, name) == pytest.approx(ref[name], abs=1e-12), name
    assert [list(r) for r in m.confusion] == ref["confusion"]
    assert m.n == len(y_true)
    if ref["auc"] is None:
        assert m.auc is None
    else:
        assert m.auc == pytest.approx(ref["auc"], abs=1e-12)
    return m


binary = st.integers(min_value=0, max_value=1)


@st.composite
def labelled_scores(draw):
    n = draw(st.integers(min_value=1, max_value=60))
    y_true = draw(st.lists(binary, min_size=n, max_size=n))
    # few distinct score values so that ties are common
    y_score = draw(
        st.lists(
            st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5, 0.75, 0.9, 1.0]) | st.floats(0, 1),
            min_size=n,
            max_size=n,
        )
    )
    threshold = draw(st.sampled_from([0.0, 0.5, 0.75, 1.01]))
    y_pred = [int(s >= threshold) for s in y_score]
    return y_true, y_pred, y_score


@settings(max_examples=150, deadline=None)
@given(labelled_scores())
def test_random_cases_agree_with_sklearn(case):
    """Any labels, predictions and tied scores: every metric equals scikit-learn's."""
    y_true, y_pred, y_score = case
    assert_matches_sklearn(y_true, y_pred, y_score)


def test_paper_formulas_on_a_known_confusion_matrix():
    """tn=50, fp=10, fn=5, tp=35: the paper's formulas by hand."""
    m = from_confusion(50, 10, 5, 35)
    assert m.accuracy == pytest.approx(85 / 100)
    assert m.precision == pytest.approx(35 / 45)
    assert m.recall == m.sensitivity == pytest.approx(35 / 40)
    assert m.specificity == pytest.approx(50 / 60)
    p, r = 35 / 45, 35 / 40
    assert m.f1 == pytest.approx(2 * p * r / (p + r))
    assert m.confusion == ((50, 10), (5, 35))


def test_no_positive_predicted_gives_zero_precision_without_error():
    """A model that says non_covid for everything: precision and F1 are 0, specificity 1."""
    m = assert_matches_sklearn([1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0.4, 0.1, 0.3, 0.2, 0.0])
    assert m.precision == 0.0 and m.f1 == 0.0 and m.recall == 0.0
    assert m.specificity == 1.0
    assert m.auc == 1.0  # the scores still rank perfectly


def test_only_negatives_in_truth():
    """A node whose validation set has no covid slice: recall 0, AUC undefined (None)."""
    m = assert_matches_sklearn([0, 0, 0], [0, 1, 0], [0.1, 0.9, 0.2])
    assert m.recall == 0.0 and m.auc is None
    assert m.specificity == pytest.approx(2 / 3)


def test_only_positives_in_truth():
    """Only covid in truth: specificity has no negatives and is 0; AUC None."""
    m = assert_matches_sklearn([1, 1, 1], [1, 0, 1], [0.9, 0.3, 0.8])
    assert m.specificity == 0.0 and m.auc is None
    assert m.recall == pytest.approx(2 / 3) and m.precision == 1.0


def test_all_scores_tied_give_auc_one_half():
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_empty_evaluation_is_all_zeros():
    m = classification_metrics([], [], [])
    assert (m.n, m.accuracy, m.precision, m.f1, m.auc) == (0, 0.0, 0.0, 0.0, None)


def test_no_scores_means_no_auc():
    assert classification_metrics([0, 1], [0, 1]).auc is None


@pytest.mark.parametrize(
    ("y_true", "y_pred", "y_score"),
    [
        ([0, 2], [0, 1], None),
        ([0, 1], [0], None),
        ([0, 1], [0, 1], [0.1]),
        ([0, 1], [0, 1], [0.1, float("nan")]),
    ],
)
def test_bad_inputs_are_refused(y_true, y_pred, y_score):
    with pytest.raises(ValueError):
        classification_metrics(y_true, y_pred, y_score)


@settings(max_examples=100, deadline=None)
@given(labelled_scores())
def test_roc_curve_matches_sklearn_and_integrates_to_auc(case):
    """The report's ROC points are sklearn's (no point dropped) and their area is the AUC."""
    y_true, _, y_score = case
    curve = roc_curve(y_true, y_score)
    if len(set(y_true)) == 2:
        fpr, tpr, thr = skm.roc_curve(y_true, y_score, drop_intermediate=False)
        np.testing.assert_allclose(curve.fpr, fpr, atol=1e-12)
        np.testing.assert_allclose(curve.tpr, tpr, atol=1e-12)
        np.testing.assert_allclose(curve.thresholds[1:], thr[1:], atol=1e-12)
        area = float(np.trapezoid(curve.tpr, curve.fpr))
        assert area == pytest.approx(roc_auc(y_true, y_score), abs=1e-9)
    assert curve.fpr[0] == curve.tpr[0] == 0.0
    assert math.isinf(curve.thresholds[0])
    assert list(curve.fpr) == sorted(curve.fpr) and list(curve.tpr) == sorted(curve.tpr)


def test_weighted_average_of_two_nodes():
    """Node a (weight 30) and node b (weight 10): rates are weighted, confusions summed."""
    a = from_confusion(10, 5, 5, 10, auc=0.8)
    b = from_confusion(4, 0, 1, 5, auc=None)
    avg = weighted_average([(a, 30), (b, 10)])
    assert avg.accuracy == pytest.approx((a.accuracy * 30 + b.accuracy * 10) / 40)
    assert avg.specificity == pytest.approx((a.specificity * 30 + 1.0 * 10) / 40)
    assert avg.auc == pytest.approx(0.8)  # b has no AUC: only a counts
    assert avg.confusion == ((14, 5), (6, 15))
    assert avg.n == 40
    assert weighted_average([(b, 1)]).auc is None
    assert weighted_average([]).n == 0
    with pytest.raises(ValueError):
        weighted_average([(a, -1)])


def test_pooled_sums_confusions():
    a = from_confusion(10, 5, 5, 10)
    b = from_confusion(4, 0, 1, 5)
    assert pooled([a, b]) == from_confusion(14, 5, 6, 15)


def test_to_dict_round_trips_through_json():
    m = classification_metrics([0, 1, 1, 0], [0, 1, 0, 0], [0.2, 0.9, 0.4, 0.1])
    d = json.loads(json.dumps(m.to_dict()))
    assert d["sensitivity"] == d["recall"] == m.recall
    assert Metrics.from_dict(d) == m
