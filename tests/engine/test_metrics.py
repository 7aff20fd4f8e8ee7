"""Accuracy, quadratic-weighted kappa, confusion matrix and the JSON report."""

from __future__ import annotations

import json

import pytest
from sklearn.metrics import cohen_kappa_score

from worker.patchgd.metrics import (
    accuracy,
    classification_report,
    confusion_matrix,
    per_class_recall,
    quadratic_weighted_kappa,
)


def test_report_on_a_small_ordinal_problem() -> None:
    y_true = [0, 1, 2, 3, 3, 2, 1, 0]
    y_pred = [0, 2, 2, 3, 1, 2, 1, 1]
    report = classification_report(y_true, y_pred, 4)
    assert report["num_samples"] == 8
    assert report["accuracy"] == 5 / 8
    assert report["qwk"] == pytest.approx(cohen_kappa_score(y_true, y_pred, weights="quadratic"))
    assert report["confusion_matrix"] == [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 2, 0], [0, 1, 0, 1]]
    assert report["per_class_recall"] == [0.5, 0.5, 1.0, 0.5]
    assert json.loads(json.dumps(report)) == report


def test_quadratic_weights_penalise_far_errors_more() -> None:
    truth = [0, 1, 2, 3, 4] * 2
    near = [min(4, t + 1) for t in truth]
    far = [4 - t for t in truth]
    assert quadratic_weighted_kappa(truth, near, 5) > quadratic_weighted_kappa(truth, far, 5)
    assert quadratic_weighted_kappa(truth, truth, 5) == 1.0


def test_single_class_edge_cases_are_finite() -> None:
    assert quadratic_weighted_kappa([2, 2, 2], [2, 2, 2], 3) == 1.0
    assert quadratic_weighted_kappa([2, 2, 2], [1, 1, 1], 3) == 0.0
    assert quadratic_weighted_kappa([], [], 3) == 0.0
    empty = classification_report([], [], 2)
    assert empty["accuracy"] == 0.0 and empty["per_class_recall"] == [None, None]


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match=r"must be in \[0, 2\)"):
        confusion_matrix([0, 2], [0, 1], 2)
    assert per_class_recall([[3, 1], [0, 0]]) == [0.75, None]
