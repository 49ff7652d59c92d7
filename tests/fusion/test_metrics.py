"""Metrics against scikit-learn and hand-computed cases; baselines; seed aggregation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from fusion import metrics as M


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 4, 200))
    p[p == 3] = 2  # class 3 is never predicted: zero-division paths
    m = M.classification_metrics(y, p, 4, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro", zero_division=0))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, p, average="weighted", zero_division=0))
    assert m["uar"] == pytest.approx(skm.balanced_accuracy_score(y, p))
    pr, rc, f1, sup = skm.precision_recall_fscore_support(y, p, labels=[0, 1, 2, 3], zero_division=0)
    for i, c in enumerate("abcd"):
        assert m["per_class"][c] == pytest.approx(
            {"precision": pr[i], "recall": rc[i], "f1": f1[i], "support": sup[i]})
    assert m["confusion"] == skm.confusion_matrix(y, p, labels=[0, 1, 2, 3]).tolist()


def test_hand_computed_case() -> None:
    # true: 0 0 0 1 1 2 ; pred: 0 0 1 1 0 2
    m = M.classification_metrics(np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 0, 2]), 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # class 0: P=2/3 R=2/3 F1=2/3; class 1: P=1/2 R=1/2 F1=1/2; class 2: 1
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["weighted_f1"] == pytest.approx((3 * 2 / 3 + 2 * 1 / 2 + 1) / 6)
    assert m["uar"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["confusion"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_class_absent_from_test_is_not_averaged() -> None:
    # class 2 exists in the label set but not in y_true or y_pred (sklearn's default averaging)
    m = M.classification_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), 3)
    assert m["macro_f1"] == pytest.approx(skm.f1_score([0, 1, 1], [0, 1, 0], average="macro"))
    assert m["per_class"]["2"]["support"] == 0


def test_majority_baseline_uses_train_majority() -> None:
    y_train = np.array([2, 2, 2, 0, 1])
    y_test = np.array([0, 2, 2, 1])  # train majority is 2, even though test is balanced-ish
    b = M.majority_baseline(y_train, y_test, 3)
    assert b["class"] == 2
    assert b["accuracy"] == pytest.approx(0.5)
    assert b["uar"] == pytest.approx(1 / 3)
    assert b["macro_f1"] == pytest.approx(skm.f1_score(y_test, [2] * 4, average="macro", zero_division=0))


def test_regression_metrics_hand_computed() -> None:
    t = np.array([-2.0, -0.4, 0.0, 1.0, 2.6, 3.4])
    p = np.array([-1.0, 0.2, -0.3, 1.4, 3.0, 2.0])
    m = M.regression_metrics(t, p)
    assert m["mae"] == pytest.approx(np.mean([1.0, 0.6, 0.3, 0.4, 0.4, 1.4]))
    assert m["corr"] == pytest.approx(np.corrcoef(t, p)[0, 1])
    # non-negative vs negative: t>=0: F F T T T T ; p>=0: F T F T T T -> 4/6
    assert m["acc2"] == pytest.approx(4 / 6)
    # zeros excluded (t=0 dropped): t>0: F F T T T ; p>0: F T T T T -> 4/5
    assert m["acc2_nonzero"] == pytest.approx(4 / 5)
    # acc7: round(clip): t -> -2 0 0 1 3 3 ; p -> -1 0 0 1 3 2 -> 4/6
    assert m["acc7"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(skm.f1_score(t >= 0, p >= 0, average="weighted"))
    nz = t != 0
    assert m["f1_nonzero"] == pytest.approx(skm.f1_score(t[nz] > 0, p[nz] > 0, average="weighted"))


def test_ccc_penalises_shift_and_shrink_where_pearson_does_not() -> None:
    t = np.array([1.0, 2.0, 3.0])
    assert M.ccc(t, t) == pytest.approx(1.0)
    # shifted by one: r stays 1; CCC = 2 cov / (var_t + var_p + shift^2) = (4/3) / (4/3 + 1)
    assert M.pearson(t, t + 1) == pytest.approx(1.0)
    assert M.ccc(t, t + 1) == pytest.approx(4 / 7)
    # shrunk to half around the mean: cov 1/3, var_p 1/6 -> (2/3) / (2/3 + 1/6)
    assert M.ccc(t, 2 + (t - 2) / 2) == pytest.approx(0.8)
    assert M.ccc(t, np.full(3, 2.0)) == 0.0  # a constant prediction agrees with nothing
    assert M.regression_metrics(t, t + 1)["ccc"] == pytest.approx(4 / 7)
    assert M.mean_baseline(t, t)["ccc"] == 0.0


def test_mean_baseline_predicts_train_mean() -> None:
    b = M.mean_baseline(np.array([1.0, 2.0, 3.0]), np.array([0.0, 4.0]))
    assert b["mean"] == pytest.approx(2.0)
    assert b["mae"] == pytest.approx(2.0)
    assert b["corr"] == 0.0  # constant prediction: r undefined, reported as 0
    assert b["acc2"] == pytest.approx(1.0)  # both true values non-negative, as is 2.0


def test_aggregate_mean_and_sample_std() -> None:
    runs = [{"accuracy": 0.5, "macro_f1": 0.4, "n": 10}, {"accuracy": 0.7, "macro_f1": 0.6, "n": 10}]
    agg = M.aggregate(runs)
    assert set(agg["mean"]) == {"accuracy", "macro_f1"}
    assert agg["mean"]["accuracy"] == pytest.approx(0.6)
    assert agg["std"]["accuracy"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert M.aggregate(runs[:1])["std"]["accuracy"] == 0.0
