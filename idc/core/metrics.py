"""The decision rule, and classification metrics at the decision threshold, per patient.

NumPy only at import (scikit-learn is imported where metrics are computed): the edge engine
needs `decide`, the compile step and evaluation need the metrics."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def decide(p_idc: float | np.ndarray, threshold: float, review_band: float):
    """The decision rule: IDC when p >= threshold; 'needs review' when p is within review_band
    of the threshold (the article's second stage: flag likely false negatives for a human)."""
    p = np.asarray(p_idc)
    return (p >= threshold).astype(int), np.abs(p - threshold) < review_band


def classification_metrics(labels, p_idc, threshold: float) -> dict:
    """Accuracy, balanced accuracy, sensitivity, specificity, precision, F1 (IDC), ROC AUC."""
    from sklearn import metrics as skm  # here, not at import: the edge server only needs decide()

    y = np.asarray(labels, dtype=int)
    p = np.asarray(p_idc, dtype=float)
    tn, fp, fn, tp = _confusion(y, p, threshold)
    both = len(set(y.tolist())) == 2
    return {
        "threshold": threshold,
        "patches": int(len(y)),
        "accuracy": (tp + tn) / len(y) if len(y) else float("nan"),
        **{name: float(value) for name, value in _rates(y, p, threshold).items()},
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "average_precision": float(skm.average_precision_score(y, p)) if both else float("nan"),
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


def per_patient(patients, labels, p_idc, threshold: float) -> list[dict]:
    """One row per patient: patches, IDC fraction (true and predicted), accuracy, sensitivity,
    specificity, and ROC AUC where the patient has patches of both classes."""
    rows = defaultdict(list)
    for patient, y, p in zip(patients, labels, p_idc):
        rows[patient].append((int(y), float(p)))
    table = []
    for patient, items in sorted(rows.items()):
        y = np.array([i[0] for i in items])
        pred = np.array([i[1] for i in items]) >= threshold
        positives = y == 1
        auc = _rates(y, np.array([i[1] for i in items]), threshold)["roc_auc"]
        table.append({
            "patient": patient,
            "patches": len(items),
            "idc_fraction": round(float(positives.mean()), 4),
            "predicted_idc_fraction": round(float(pred.mean()), 4),
            "accuracy": round(float((pred == positives).mean()), 4),
            "sensitivity": round(float(pred[positives].mean()), 4) if positives.any() else None,
            "specificity": round(float(1 - pred[~positives].mean()), 4) if (~positives).any() else None,
            "roc_auc": None if np.isnan(auc) else round(float(auc), 4),
        })
    return table


INTERVAL_METRICS = ("balanced_accuracy", "f1_idc", "sensitivity", "specificity", "roc_auc")


def _confusion(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """(tn, fp, fn, tp) at the threshold."""
    predicted, positives = p >= threshold, y == 1
    return (int((~predicted & ~positives).sum()), int((predicted & ~positives).sum()),
            int((~predicted & positives).sum()), int((predicted & positives).sum()))


def _rates(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """The INTERVAL_METRICS of one set, in NumPy (fast enough to repeat for a bootstrap)."""
    from scipy.stats import rankdata

    tn, fp, fn, tp = _confusion(y, p, threshold)
    sensitivity = tp / (tp + fn) if tp + fn else np.nan
    specificity = tn / (tn + fp) if tn + fp else np.nan
    n_pos, n_neg = tp + fn, tn + fp
    # ROC AUC as the Mann-Whitney U statistic (ties count half), as sklearn computes it.
    auc = ((rankdata(p)[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)) if n_pos and n_neg else np.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan
    return {"balanced_accuracy": (sensitivity + specificity) / 2, "f1_idc": f1, "sensitivity": sensitivity,
            "specificity": specificity, "roc_auc": auc}


def patient_bootstrap(patients, labels, p_idc, threshold: float, rounds: int = 1000, level: float = 0.95,
                      seed: int = 0) -> dict[str, list[float]]:
    """Percentile confidence intervals of INTERVAL_METRICS by bootstrap over PATIENTS: patches of
    one patient are not independent, so whole patients are resampled (with replacement)."""
    y, p = np.asarray(labels, dtype=int), np.asarray(p_idc, dtype=float)
    by_patient = defaultdict(list)
    for index, patient in enumerate(patients):
        by_patient[patient].append(index)
    groups = [np.array(indices) for indices in by_patient.values()]
    rng = np.random.default_rng(seed)
    samples = {name: [] for name in INTERVAL_METRICS}
    for _ in range(rounds):
        chosen = np.concatenate([groups[i] for i in rng.integers(len(groups), size=len(groups))])
        for name, value in _rates(y[chosen], p[chosen], threshold).items():
            samples[name].append(value)
    tail = (1 - level) / 2 * 100
    return {name: [round(float(v), 4) for v in np.nanpercentile(values, [tail, 100 - tail])]
            if not np.all(np.isnan(values)) else [float("nan"), float("nan")] for name, values in samples.items()}
