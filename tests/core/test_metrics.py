"""Patient-bootstrap confidence intervals (idc.core.metrics.patient_bootstrap)."""

import numpy as np

from idc.core.metrics import classification_metrics, patient_bootstrap


def test_a_perfect_classifier_has_degenerate_intervals_at_one():
    labels = np.array([0, 1] * 50)
    patients = [str(i // 4) for i in range(100)]
    intervals = patient_bootstrap(patients, labels, labels * 0.9 + 0.05, threshold=0.5, rounds=200)
    assert all(interval == [1.0, 1.0] for interval in intervals.values()), intervals


def test_a_known_case_gives_the_binomial_interval():
    # 400 patients with one IDC patch each, 70 % of them found: the sensitivity's 95 % interval is
    # about 0.7 +- 1.96 * sqrt(0.7 * 0.3 / 400) = [0.655, 0.745].
    labels = np.ones(400, dtype=int)
    p = np.where(np.arange(400) < 280, 0.9, 0.1)
    low, high = patient_bootstrap([str(i) for i in range(400)], labels, p, 0.5, rounds=2000)["sensitivity"]
    assert abs(low - 0.655) < 0.015 and abs(high - 0.745) < 0.015, (low, high)


def test_patients_not_patches_are_resampled():
    # Two patients, each all right or all wrong: patch counts are large, but the interval must be
    # as wide as two independent units allow (resampling patches would make it tiny).
    labels = np.ones(2000, dtype=int)
    p = np.where(np.arange(2000) < 1000, 0.9, 0.1)
    patients = ["a"] * 1000 + ["b"] * 1000
    low, high = patient_bootstrap(patients, labels, p, 0.5, rounds=500)["sensitivity"]
    assert low == 0.0 and high == 1.0


def test_the_metrics_agree_with_sklearn():
    from sklearn import metrics as skm

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    p = np.clip(labels * 0.3 + rng.random(300) * 0.7, 0, 1).round(2)  # with ties
    predicted = (p >= 0.5).astype(int)
    ours = classification_metrics(labels, p, 0.5)
    expected = {"balanced_accuracy": skm.balanced_accuracy_score(labels, predicted),
                "f1_idc": skm.f1_score(labels, predicted), "sensitivity": skm.recall_score(labels, predicted),
                "specificity": skm.recall_score(labels, predicted, pos_label=0),
                "roc_auc": skm.roc_auc_score(labels, p), "precision": skm.precision_score(labels, predicted),
                "accuracy": skm.accuracy_score(labels, predicted)}
    for name, value in expected.items():
        assert abs(ours[name] - value) < 1e-12, name
    intervals = patient_bootstrap([str(i) for i in range(300)], labels, p, 0.5, rounds=400)
    assert all(low <= ours[name] <= high for name, (low, high) in intervals.items())
