"""The decision rule chosen on VALIDATION patients (never test): the threshold that maximises
balanced accuracy, and the slide-context rule (radius, weight, threshold) that does, both written
into the model bundle by training."""

from __future__ import annotations

import numpy as np

from idc.core.context import with_context

THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.005), 3)  # a coarse grid: less to overfit than every p
CONTEXT_RADII = (1, 2)
CONTEXT_WEIGHTS = np.round(np.arange(0.0, 0.91, 0.1), 2)


def best_threshold(labels, p_idc) -> tuple[float, float]:
    """(threshold, balanced accuracy) maximising balanced accuracy; ties: the one nearest 0.5."""
    y, p = np.asarray(labels), np.asarray(p_idc, dtype=float)
    positives, negatives = np.sort(p[y == 1]), np.sort(p[y == 0])
    if not len(positives) or not len(negatives):
        raise ValueError("choosing a threshold needs patches of both classes")
    sensitivity = 1 - np.searchsorted(positives, THRESHOLDS, side="left") / len(positives)
    specificity = np.searchsorted(negatives, THRESHOLDS, side="left") / len(negatives)
    balanced = (sensitivity + specificity) / 2
    best = np.flatnonzero(np.isclose(balanced, balanced.max()))
    chosen = best[np.argmin(np.abs(THRESHOLDS[best] - 0.5))]
    return float(THRESHOLDS[chosen]), float(balanced[chosen])


def best_slide_context(patients, xs, ys, labels, p_idc) -> dict:
    """The radius and weight (and the threshold that goes with them) maximising balanced accuracy;
    weight 0 (patch-alone) wins unless context helps."""
    best = None
    for radius in CONTEXT_RADII:
        for weight in CONTEXT_WEIGHTS:
            threshold, balanced = best_threshold(labels, with_context(patients, xs, ys, p_idc, radius, weight))
            if best is None or balanced > best["validation_balanced_accuracy"] + 1e-9:
                best = {"radius": radius, "weight": float(weight), "threshold": threshold,
                        "validation_balanced_accuracy": round(balanced, 4)}
    return best
