"""`mmpeft.training.metrics.classification_metrics` against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from mmpeft.training.metrics import classification_metrics, format_report


def random_case(seed: int, num_classes: int = 5, n: int = 60):
    """Labels never contain class `num_classes - 1`; predictions never contain class 1 (which labels do)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes - 1, size=n)
    labels[:2] = 1  # make sure the never-predicted class is present in the labels
    preds = rng.choice([c for c in range(num_classes) if c != 1], size=n)
    # Mostly right, so the metrics are not all near zero.
    right = (rng.random(n) < 0.6) & (labels != 1)
    preds[right] = labels[right]
    preds[:3] = num_classes - 1  # and the absent class is predicted (a pure false positive)
    return labels, preds


def check_against_sklearn(labels, preds, num_classes: int) -> dict:
    names = [f"class_{c}" for c in range(num_classes)]
    classes = list(range(num_classes))
    got = classification_metrics(labels, preds, names)

    assert got["accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-12)
    assert got["num_samples"] == len(labels)
    assert got["labels"] == names
    assert got["confusion_matrix"] == confusion_matrix(labels, preds, labels=classes).tolist()
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=classes, average=average, zero_division=0)
        assert got[f"{average}_precision"] == pytest.approx(p, abs=1e-12), average
        assert got[f"{average}_recall"] == pytest.approx(r, abs=1e-12), average
        assert got[f"{average}_f1"] == pytest.approx(f, abs=1e-12), average
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=classes, average=None, zero_division=0)
    for i, name in enumerate(names):
        row = got["per_class"][name]
        assert row["precision"] == pytest.approx(p[i], abs=1e-12), name
        assert row["recall"] == pytest.approx(r[i], abs=1e-12), name
        assert row["f1"] == pytest.approx(f[i], abs=1e-12), name
        assert row["support"] == s[i] and isinstance(row["support"], int)
    return got


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_with_unpredicted_and_absent_classes(seed):
    labels, preds = random_case(seed)
    assert 1 in labels and 1 not in preds and 4 not in labels and 4 in preds
    got = check_against_sklearn(labels, preds, 5)
    assert got["per_class"]["class_1"]["precision"] == 0.0  # never predicted: 0/0 -> 0
    assert got["per_class"]["class_4"]["recall"] == 0.0 and got["per_class"]["class_4"]["support"] == 0
    assert isinstance(got["accuracy"], float) and all(isinstance(v, int) for row in got["confusion_matrix"] for v in row)


@pytest.mark.parametrize("case", ["perfect", "all_wrong", "one_class_predicted"])
def test_edge_cases_match_sklearn(case):
    labels = np.random.default_rng(7).integers(0, 3, size=40)
    preds = {"perfect": labels.copy(), "all_wrong": (labels + 1) % 3, "one_class_predicted": np.zeros_like(labels)}
    check_against_sklearn(labels, preds[case], 3)


def test_binary_matches_sklearn():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, size=25)
    check_against_sklearn(labels, np.where(rng.random(25) < 0.7, labels, 1 - labels), 2)


def test_accepts_torch_tensors_and_lists():
    import torch

    labels, preds = random_case(11)
    expected = classification_metrics(labels, preds, list("abcde"))
    assert classification_metrics(torch.from_numpy(labels), torch.from_numpy(preds), list("abcde")) == expected
    assert classification_metrics(labels.tolist(), preds.tolist(), list("abcde")) == expected


def test_format_report_lists_every_class():
    labels, preds = random_case(3)
    report = format_report(classification_metrics(labels, preds, ["neg", "neu", "pos", "mixed", "unused"]))
    for name in ("neg", "neu", "pos", "mixed", "unused", "macro avg", "weighted avg", "accuracy"):
        assert name in report
