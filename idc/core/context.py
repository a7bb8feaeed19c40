"""Slide context: the patches of one patient tile the slide (x, y in their file names, a 50 px
grid) and IDC regions are contiguous, so a patch's neighbours are evidence about it.

Two rules, chosen on validation patients at training time and kept in the model bundle
(`slide_context`), so every path that classifies a patient's patches together (`apply_rule`) applies
the same one; single-patch requests stay patch-alone. NumPy only.

- "weighted" (`with_context`): each patch's P(IDC) blended with the mean P(IDC) of its neighbours
  within `radius` grid steps, with a weight and threshold.
- "learned" (`learned_context`): a logistic regression over the patch's own P(IDC) and its
  neighbours' (CONTEXT_FEATURES), fitted on validation patients (idc.training.calibration).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

GRID = 50  # px between neighbouring patches of the dataset


# As logits. (The 8 neighbours' highest P(IDC) and how many of them are present were features too, and
# made the rule worse on held-out patient folds: benchmarks/context.py.)
CONTEXT_FEATURES = ("own P(IDC)", "mean P(IDC) of the 8 neighbours", "mean P(IDC) within 2 steps")


def neighbour_mean(patients, xs, ys, p_idc, radius: int) -> np.ndarray:
    """Mean P(IDC) of each patch's neighbours (same patient, within `radius` grid steps, itself
    excluded); NaN for a patch without neighbours."""
    p = np.asarray(p_idc, dtype=float)
    cells = defaultdict(dict)  # patient -> (column, row) -> index
    for index, (patient, x, y) in enumerate(zip(patients, xs, ys)):
        cells[patient][(int(x) // GRID, int(y) // GRID)] = index
    offsets = [(dx, dy) for dx in range(-radius, radius + 1) for dy in range(-radius, radius + 1) if dx or dy]
    means = np.full(len(p), np.nan)
    for grid in cells.values():
        for (column, row), index in grid.items():
            near = [grid[cell] for cell in ((column + dx, row + dy) for dx, dy in offsets) if cell in grid]
            if near:
                means[index] = p[near].mean()
    return means


def with_context(patients, xs, ys, p_idc, radius: int, weight: float) -> np.ndarray:
    """(1 - weight) * P(IDC) + weight * the neighbours' mean; a patch alone keeps its own P(IDC)."""
    p = np.asarray(p_idc, dtype=float)
    means = neighbour_mean(patients, xs, ys, p, radius)
    return np.where(np.isnan(means), p, (1 - weight) * p + weight * np.nan_to_num(means))


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def context_features(patients, xs, ys, p_idc) -> np.ndarray:
    """CONTEXT_FEATURES of each patch (N, 3); a missing neighbourhood reads as the patch's own P(IDC)."""
    p = np.asarray(p_idc, dtype=float)
    own = lambda values: np.where(np.isnan(values), p, values)  # noqa: E731
    return np.stack([logit(p)] + [logit(own(neighbour_mean(patients, xs, ys, p, radius))) for radius in (1, 2)], axis=1)


def learned_context(patients, xs, ys, p_idc, coefficients) -> np.ndarray:
    """P(IDC) from the learned rule: `coefficients` are its intercept, then one per CONTEXT_FEATURES."""
    w = np.asarray(coefficients, dtype=float)
    return 1 / (1 + np.exp(-(w[0] + context_features(patients, xs, ys, p_idc) @ w[1:])))


def apply_rule(rule: dict, patients, xs, ys, p_idc) -> np.ndarray:
    """A bundle's slide_context rule on patches classified together (the weighted mean when it names
    no kind: bundles from before the learned rule)."""
    if rule.get("kind", "weighted") == "learned":
        return learned_context(patients, xs, ys, p_idc, rule["coefficients"])
    return with_context(patients, xs, ys, p_idc, rule["radius"], rule["weight"])


def rule_fields(rule: dict) -> dict:
    """What a report or an API answer says of the rule it applied."""
    if rule.get("kind", "weighted") == "learned":
        return {"kind": "learned", "coefficients": rule["coefficients"], "threshold": rule["threshold"]}
    return {"kind": "weighted", "radius": rule["radius"], "weight": rule["weight"], "threshold": rule["threshold"]}


def describe_rule(rule: dict) -> str:
    if rule.get("kind", "weighted") == "learned":
        return "learned from each patch's own and its neighbours' P(IDC)"
    return f"neighbours within {rule['radius']} patches, weight {rule['weight']}"
