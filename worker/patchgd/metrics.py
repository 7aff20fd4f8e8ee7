"""Classification metrics reported per epoch and for the final model: plain JSON-able values."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import cohen_kappa_score


def _as_int_array(values: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


def accuracy(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Fraction of predictions equal to the label (0.0 for no samples)."""
    t, p = _as_int_array(y_true), _as_int_array(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"{t.size} labels but {p.size} predictions")
    return float((t == p).mean()) if t.size else 0.0


def quadratic_weighted_kappa(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_classes: int
) -> float:
    """Cohen's kappa with quadratic weights (the PANDA metric), defined on every edge case.

    Kappa is undefined when the expected disagreement is zero (e.g. labels and predictions all
    the same single class): sklearn then warns and returns NaN. We return 1.0 when the predictions
    agree perfectly and 0.0 otherwise (no better than chance), so the value is always a finite
    JSON number.
    """
    t, p = _as_int_array(y_true), _as_int_array(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"{t.size} labels but {p.size} predictions")
    if t.size == 0:
        return 0.0
    with warnings.catch_warnings():
        # Degenerate inputs are handled below; their warnings are expected, not news.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        kappa = cohen_kappa_score(t, p, labels=list(range(num_classes)), weights="quadratic")
    if not np.isfinite(kappa):
        return 1.0 if np.array_equal(t, p) else 0.0
    return float(kappa)


def confusion_matrix(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_classes: int
) -> list[list[int]]:
    """``matrix[true][predicted]`` counts as nested lists."""
    t, p = _as_int_array(y_true), _as_int_array(y_pred)
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"labels and predictions must be in [0, {num_classes})")
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (t, p), 1)
    return matrix.tolist()


def per_class_recall(matrix: list[list[int]]) -> list[float | None]:
    """Recall of each class from a confusion matrix (None for a class with no samples)."""
    recalls: list[float | None] = []
    for i, row in enumerate(matrix):
        total = sum(row)
        recalls.append(row[i] / total if total else None)
    return recalls


def classification_report(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_classes: int
) -> dict:
    """Accuracy, QWK, confusion matrix, per-class recall and sample count in one JSON-able dict."""
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    return {
        "num_samples": int(_as_int_array(y_true).size),
        "accuracy": accuracy(y_true, y_pred),
        "qwk": quadratic_weighted_kappa(y_true, y_pred, num_classes),
        "confusion_matrix": matrix,
        "per_class_recall": per_class_recall(matrix),
    }
