"""The decision rule chosen on validation patients: threshold and slide context."""

import numpy as np
import pytest

from idc.core.context import neighbour_mean, with_context
from idc.training.calibration import best_slide_context, best_threshold


def test_best_threshold_maximises_balanced_accuracy_on_a_grid():
    labels = np.array([0, 0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.62, 0.65, 0.9])
    # any threshold in (0.62, 0.65] separates the classes; the grid's first such value is 0.625
    assert best_threshold(labels, p) == (0.625, 1.0)
    # ties are broken towards 0.5: perfectly separable at every threshold in (0.3, 0.7]
    assert best_threshold(np.array([0, 1]), np.array([0.3, 0.7]))[0] == 0.5
    with pytest.raises(ValueError, match="both classes"):
        best_threshold(np.array([1, 1]), np.array([0.2, 0.9]))


def test_neighbour_mean_follows_the_slide_grid():
    # a 3x3 block of one patient at the dataset's 50 px grid (x, y offsets like the real names),
    # and a lone patch of another patient at the same place
    xs = [1001 + 50 * c for r in range(3) for c in range(3)] + [1051]
    ys = [451 + 50 * r for r in range(3) for c in range(3)] + [501]
    patients = ["a"] * 9 + ["b"]
    p = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.9, 0.9, 0.9, 0.5])
    means = neighbour_mean(patients, xs, ys, p, radius=1)
    assert means[4] == pytest.approx(2.7 / 8)  # the centre: its 8 neighbours, not itself
    assert means[0] == pytest.approx(1.0 / 3)  # a corner: 3 neighbours
    assert np.isnan(means[9])  # patient b has no neighbours (a's patches are not b's)
    blended = with_context(patients, xs, ys, p, radius=1, weight=0.5)
    assert blended[4] == pytest.approx(0.5 * 1.0 + 0.5 * 2.7 / 8) and blended[9] == 0.5


def test_context_is_chosen_when_contiguous_regions_make_it_pay():
    rng = np.random.default_rng(0)
    xs, ys, patients, labels = [], [], [], []
    for patient in range(6):  # IDC in the left half of each 12x12 slide
        for row in range(12):
            for column in range(12):
                xs.append(50 * column + 1)
                ys.append(50 * row + 1)
                patients.append(str(patient))
                labels.append(int(column < 6))
    labels = np.array(labels)
    p = np.clip(0.5 + (labels - 0.5) * 0.3 + rng.normal(0, 0.25, len(labels)), 0, 1)  # noisy patches
    alone = best_threshold(labels, p)[1]
    rule = best_slide_context(patients, xs, ys, labels, p)
    assert rule["weight"] > 0 and rule["validation_balanced_accuracy"] > alone + 0.05, (rule, alone)
    # no spatial structure: context cannot help, patch-alone (weight 0) is kept
    shuffled = rng.permutation(len(labels))
    flat = best_slide_context(patients, np.array(xs)[shuffled], np.array(ys)[shuffled], labels, p)
    assert flat["validation_balanced_accuracy"] <= alone + 0.02


def slides_with_idc_on_the_left(seed: int = 0, noise: float = 0.25):
    """Six 12x12-patch slides, IDC in the left half of each, and noisy patch-alone P(IDC)."""
    rng = np.random.default_rng(seed)
    cells = [(str(patient), 50 * column + 1, 50 * row + 1, int(column < 6))
             for patient in range(6) for row in range(12) for column in range(12)]
    patients, xs, ys, labels = (list(v) for v in zip(*cells))
    labels = np.array(labels)
    return patients, xs, ys, labels, np.clip(0.5 + (labels - 0.5) * 0.3 + rng.normal(0, noise, len(labels)), 0, 1)


def test_the_learned_context_rule_learns_from_the_neighbourhood_and_holds_on_new_slides():
    from idc.core.context import CONTEXT_FEATURES, apply_rule, context_features, learned_context, rule_fields
    from idc.training.calibration import fit_learned_context

    patients, xs, ys, labels, p = slides_with_idc_on_the_left()
    rule = fit_learned_context(patients, xs, ys, labels, p)
    assert rule["kind"] == "learned" and len(rule["coefficients"]) == 1 + len(CONTEXT_FEATURES)
    assert rule["coefficients"][2] > 0  # the neighbours' P(IDC) counts for IDC
    alone = best_threshold(labels, p)[1]
    assert rule["validation_balanced_accuracy"] > alone + 0.05, (rule, alone)
    # on slides it was not fitted on, it still beats patch-alone
    patients2, xs2, ys2, labels2, p2 = slides_with_idc_on_the_left(seed=1)
    q = apply_rule(rule, patients2, xs2, ys2, p2)
    np.testing.assert_allclose(q, learned_context(patients2, xs2, ys2, p2, rule["coefficients"]))
    balanced = lambda y, yhat: ((yhat[y == 1]).mean() + (1 - yhat[y == 0]).mean()) / 2  # noqa: E731
    assert balanced(labels2, q >= rule["threshold"]) > balanced(labels2, p2 >= best_threshold(labels2, p2)[0]) + 0.05
    assert rule_fields(rule) == {"kind": "learned", "coefficients": rule["coefficients"], "threshold": rule["threshold"]}
    # a patch without neighbours reads its own P(IDC) for theirs
    lone = context_features(["x"], [0], [0], [0.8])[0]
    assert lone[1] == lone[2] == lone[0] == pytest.approx(np.log(0.8 / 0.2))
    with pytest.raises(ValueError, match="both classes"):
        fit_learned_context(patients, xs, ys, np.zeros(len(labels)), p)


def test_the_review_band_is_the_widest_within_the_share_and_never_lowers_sensitivity():
    from idc.training.calibration import widest_review_band

    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([0.45, 0.38, 0.9, 0.95, 0.52, 0.1, 0.2, 0.05, 0.15, 0.3])
    review = widest_review_band(labels, p, threshold=0.5, max_share=0.2)
    # 0.45 and 0.52 are within 0.05 of the threshold; 0.38 needs a band over 0.12 (a third patch)
    assert review["share_flagged"] == 0.2 and 0.05 < review["review_band"] <= 0.12
    assert review["misses_held"] == 0.5  # one of the two misses (0.45, not 0.38)
    wider = widest_review_band(labels, p, threshold=0.5, max_share=0.3)
    assert wider["misses_held"] == 1.0 and wider["review_band"] > review["review_band"]
    # the band only flags: the decision at the threshold, hence sensitivity, is unchanged
    from idc.core.metrics import decide

    for band in (0.0, review["review_band"], wider["review_band"]):
        assert decide(p, 0.5, band)[0].tolist() == (p >= 0.5).astype(int).tolist()
