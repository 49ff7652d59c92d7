"""Evaluation metrics, the trivial baselines beside them, and aggregation over seeds.

Computed with numpy from a confusion matrix so the numbers are auditable and cheap; the tests
check them against scikit-learn. Conventions follow scikit-learn's defaults: macro averages
run over the classes that occur in the true or predicted labels, a zero denominator gives 0,
UAR (balanced accuracy) averages recall over the classes present in the true labels.
Every value returned is a plain Python float/int/list so it goes straight into JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SCALAR_KEYS_CLASSIFICATION = ("accuracy", "macro_f1", "weighted_f1", "uar")
SCALAR_KEYS_REGRESSION = ("mae", "corr", "ccc", "acc2", "acc2_nonzero", "acc7", "f1", "f1_nonzero")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [true, predicted] over the fixed class list (rows sum to the support)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num/den with 0 where den == 0 (scikit-learn's zero_division=0)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den != 0)
    return out


def metrics_from_confusion(cm: np.ndarray, class_names: Sequence[str] | None = None) -> dict:
    """All classification metrics from one confusion matrix (also used for pooled seeds)."""
    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = int(cm.sum())
    seen = (support > 0) | (predicted > 0)  # classes in y_true ∪ y_pred
    in_true = support > 0
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "weighted_f1": float((f1 * support).sum() / support.sum()) if support.sum() else 0.0,
        "uar": float(recall[in_true].mean()) if in_true.any() else 0.0,
        "per_class": {
            names[i]: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in range(k)
        },
        "confusion": cm.tolist(),
        "n": total,
    }


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, class_names: Sequence[str] | None = None
) -> dict:
    """accuracy, macro/weighted F1, UAR, per-class P/R/F1/support and the confusion matrix."""
    return metrics_from_confusion(confusion_matrix(y_true, y_pred, n_classes), class_names)


def majority_class(y_train: np.ndarray, n_classes: int) -> int:
    """The most frequent training class (lowest index on ties, so it is deterministic)."""
    return int(np.argmax(np.bincount(np.asarray(y_train, dtype=np.int64), minlength=n_classes)))


def majority_baseline(y_train: np.ndarray, y_test: np.ndarray, n_classes: int) -> dict:
    """Predict the train majority for every test row: the floor a model must clear."""
    pred = np.full(len(y_test), majority_class(y_train, n_classes), dtype=np.int64)
    m = classification_metrics(y_test, pred, n_classes)
    return {"class": int(pred[0]) if len(pred) else majority_class(y_train, n_classes),
            "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "uar": m["uar"]}


def _binary_f1_weighted(t: np.ndarray, p: np.ndarray) -> float:
    """Support-weighted F1 of a binary split (the MOSI/MOSEI convention for 'F1')."""
    if len(t) == 0:
        return 0.0
    return metrics_from_confusion(confusion_matrix(t.astype(int), p.astype(int), 2))["weighted_f1"]


def pearson(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Pearson r; 0.0 when either side is constant (r is undefined, and no better than 0)."""
    a = np.asarray(y_true, dtype=np.float64) - np.mean(y_true)
    b = np.asarray(y_pred, dtype=np.float64) - np.mean(y_pred)
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def ccc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Lin's concordance correlation coefficient, 2 cov / (var_t + var_p + (mean_t - mean_p)^2)
    with population moments: the AVEC / OMG metric for valence and arousal. Unlike Pearson r it
    drops when predictions are shifted or shrunk; 0.0 for a constant prediction of a constant
    truth (undefined) and for an empty set."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if not len(t):
        return 0.0
    mt, mp = float(t.mean()), float(p.mean())
    den = float(t.var()) + float(p.var()) + (mt - mp) ** 2
    return float(2.0 * np.mean((t - mt) * (p - mp)) / den) if den > 0 else 0.0


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Regression metrics: MAE, Pearson r (corr) and concordance (ccc) on any scale, and the
    MOSI/MOSEI sentiment metrics, which assume scores on [-3, 3] (reports show them only for
    the `sentiment` target):

    acc2: non-negative vs negative over all rows; acc2_nonzero: positive vs negative with
    the zero-labelled rows left out (both conventions appear in the literature); acc7: the
    scores rounded to the 7 integer classes after clipping to [-3, 3]; f1 / f1_nonzero: the
    support-weighted binary F1 of the same two splits.
    """
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    nz = t != 0
    tb, pb = t >= 0, p >= 0
    tnz, pnz = t[nz] > 0, p[nz] > 0
    return {
        "mae": float(np.mean(np.abs(t - p))) if len(t) else 0.0,
        "corr": pearson(t, p),
        "ccc": ccc(t, p),
        "acc2": float(np.mean(tb == pb)) if len(t) else 0.0,
        "acc2_nonzero": float(np.mean(tnz == pnz)) if nz.any() else 0.0,
        "acc7": float(np.mean(np.round(np.clip(t, -3, 3)) == np.round(np.clip(p, -3, 3))))
        if len(t) else 0.0,
        "f1": _binary_f1_weighted(tb, pb),
        "f1_nonzero": _binary_f1_weighted(tnz, pnz),
        "n": int(len(t)),
    }


def mean_baseline(y_train: np.ndarray, y_test: np.ndarray) -> dict:
    """Predict the train mean for every test row (the regression analogue of majority)."""
    mu = float(np.mean(y_train)) if len(y_train) else 0.0
    m = regression_metrics(y_test, np.full(len(y_test), mu))
    m.pop("n")
    return {"mean": mu, **m}


def aggregate(per_seed: Sequence[dict], keys: Sequence[str] | None = None) -> dict:
    """Mean and standard deviation over seeds of every scalar metric.

    std is the sample standard deviation (ddof=1) — the honest spread for a handful of seeds;
    0.0 for a single seed.
    """
    if not per_seed:
        return {"mean": {}, "std": {}}
    if keys is None:
        keys = [k for k, v in per_seed[0].items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"]
    mean, std = {}, {}
    for k in keys:
        vals = np.array([float(s[k]) for s in per_seed], dtype=np.float64)
        mean[k] = float(vals.mean())
        std[k] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std}
