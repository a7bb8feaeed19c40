"""The decision rule chosen on VALIDATION patients (never test): the threshold that maximises
balanced accuracy, the review band that sends at most a given share of patches to a human, and
the slide-context rule (the weighted mean's radius, weight and threshold that maximise balanced
accuracy, or the learned rule fitted there); all written into the model bundle by training."""

from __future__ import annotations

import numpy as np

from idc.core.context import CONTEXT_FEATURES, context_features, learned_context, with_context

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


def widest_review_band(labels, p_idc, threshold: float, max_share: float) -> dict:
    """The widest band around the threshold that flags at most `max_share` of the patches: for that
    many patches it catches the most misses (a wider band never loses one). With the share of
    patches flagged and of the misses (false negatives) it holds."""
    y, p = np.asarray(labels), np.asarray(p_idc, dtype=float)
    missed = (y == 1) & (p < threshold)
    band = 0.0
    for candidate in np.round(np.arange(0.005, 0.5, 0.005), 3):
        if (np.abs(p - threshold) < candidate).mean() > max_share:
            break
        band = float(candidate)
    flagged = np.abs(p - threshold) < band
    return {"review_band": band, "share_flagged": round(float(flagged.mean()), 4),
            "misses_held": round(float((flagged & missed).sum() / missed.sum()), 4) if missed.any() else None}


def tradeoff(labels, p_idc, review_band: float, thresholds=np.round(np.arange(0.1, 0.91, 0.05), 2)) -> list[dict]:
    """Sensitivity, specificity and the share sent to review along the threshold."""
    y, p = np.asarray(labels), np.asarray(p_idc, dtype=float)
    return [{"threshold": float(t), "sensitivity": round(float((p[y == 1] >= t).mean()), 4),
             "specificity": round(float((p[y == 0] < t).mean()), 4),
             "share_to_review": round(float((np.abs(p - t) < review_band).mean()), 4)} for t in thresholds]


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


def fit_learned_context(patients, xs, ys, labels, p_idc, l2: float = 1.0, steps: int = 50) -> dict:
    """The learned slide-context rule (idc.core.context.learned_context): a logistic regression of the
    label on the patch's CONTEXT_FEATURES, the classes weighted equally (balanced accuracy is what it
    is judged by), an L2 penalty of `l2` on the slopes, fitted by Newton's method; then its threshold."""
    y = np.asarray(labels, dtype=float)
    if y.min() == y.max():
        raise ValueError("fitting the slide-context rule needs patches of both classes")
    x = np.hstack([np.ones((len(y), 1)), context_features(patients, xs, ys, p_idc)])
    weights = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))  # each class weighs half
    penalty = np.diag([0.0] + [l2] * (x.shape[1] - 1))
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        q = 1 / (1 + np.exp(-(x @ w)))
        gradient = x.T @ (weights * (q - y)) + penalty @ w
        hessian = (x * (weights * q * (1 - q))[:, None]).T @ x + penalty
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    threshold, balanced = best_threshold(y, learned_context(patients, xs, ys, p_idc, w))
    return {"kind": "learned", "coefficients": [round(float(v), 6) for v in w], "features": list(CONTEXT_FEATURES),
            "threshold": threshold, "validation_balanced_accuracy": round(balanced, 4)}
