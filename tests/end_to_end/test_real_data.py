"""Slow tests on real IDC patches and real Inception V3 weights from ../shared (skipped with the
reason where they are absent). CI runs them too."""

import pytest

from idc.core.bundle import SPLITS
from idc.core.errors import WeightsError
from idc.training.evaluation import evaluate
from idc.training.model import build_trunk
from idc.training.train import train
from tests.paths import SHARED_WEIGHTS, require_shared

pytestmark = pytest.mark.slow


def test_real_patches_sorted_by_patient(real_project):
    config, report, _ = real_project
    assert report.patients == {"train": 14, "validation": 3, "test": 4}
    assert not report.skipped
    splits = {s: {p.patient for p in config.model.read_manifest(s)} for s in SPLITS}
    assert not splits["train"] & splits["test"] and not splits["validation"] & splits["test"]


def test_real_model_beats_chance_on_held_out_patients(real_project, capsys):
    config, _, record = real_project
    assert record["trunk"]["feature_dim"] == 2 * (256 + 288)  # mean+std of mixed0 and mixed1
    result = evaluate(config, split="test")
    assert "Final Streaming Accuracy" in capsys.readouterr().out
    # Chance is 0.5; a few hundred real patches at 75 px are enough for far better than that (this
    # small model, with the default JPEG view: balanced accuracy 0.79, ROC AUC 0.80 on 160 patches).
    assert result["balanced_accuracy"] >= 0.7 and result["roc_auc"] >= 0.75, result


def test_retraining_reuses_the_real_bottlenecks(real_project):
    config, _, _ = real_project
    again = train(config)
    assert again["bottleneck_cache"]["train"]["computed"] == 0
    assert again["bottleneck_cache"]["train"]["hits"] == 14 * 40 * len(config.classifier.train_views)


def test_unknown_feature_layer_lists_the_choices():
    require_shared(SHARED_WEIGHTS)
    with pytest.raises(WeightsError, match=r"\['mixed99'\].*mixed0, mixed1"):
        build_trunk(str(SHARED_WEIGHTS), 75, ["mixed99"])
