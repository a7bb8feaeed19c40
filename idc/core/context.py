"""Slide context: the patches of one patient tile the slide (x, y in their file names, a 50 px
grid) and IDC regions are contiguous, so a patch's neighbours are evidence about it.

`with_context` blends each patch's P(IDC) with the mean P(IDC) of its neighbours within `radius`
grid steps; the radius, weight and threshold are chosen on validation patients at training time
and kept in the model bundle (`slide_context`), so every path that classifies a patient's patches
together applies the same rule. Single-patch requests stay patch-alone. NumPy only.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

GRID = 50  # px between neighbouring patches of the dataset


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
