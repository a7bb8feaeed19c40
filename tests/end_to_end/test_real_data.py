"""Slow tests on real IDC patches and real Inception V3 weights from ../shared (skipped with the
reason where they are absent). CI runs them too."""

import csv
import os

import pytest

from idc.core.bundle import SPLITS
from idc.training import data
from idc.core.config import load_config
from idc.core.errors import WeightsError
from idc.training.evaluation import evaluate
from idc.training.model import build_trunk
from idc.training.train import train
from tests.paths import SHARED_DATA, SHARED_PATIENTS, SHARED_WEIGHTS, require_shared
from tests.synthetic import write_config

pytestmark = pytest.mark.slow


def real_subset(folder, patients_per_split=(14, 3, 4), per_class=20):
    """A few hundred real patches in the Kaggle layout (symlinks), from patients of the reference
    train/extra and val lists, so the test covers several patients per split."""
    require_shared(SHARED_DATA)
    require_shared(SHARED_PATIENTS)
    rows = list(csv.DictReader(SHARED_PATIENTS.open()))
    # patients with both classes, so every split holds IDC and non-IDC patches
    both = [r["patient_id"] for r in rows if int(r["negatives"]) >= per_class and int(r["positives"]) >= per_class]
    chosen = both[:sum(patients_per_split)]
    for patient in chosen:
        for label in ("0", "1"):
            target = folder / patient / label
            target.mkdir(parents=True)
            for source in sorted((SHARED_DATA / patient / label).glob("*.png"))[:per_class]:
                os.symlink(source, target / source.name)
    return folder, chosen


@pytest.fixture(scope="module")
def real_project(tmp_path_factory):
    require_shared(SHARED_WEIGHTS)
    tmp = tmp_path_factory.mktemp("real")
    raw, patients = real_subset(tmp / "raw")
    config = load_config(write_config(
        tmp, dataset_dir=str(raw), weights=str(SHARED_WEIGHTS), image_size=75, batch_size=32,
        head_batch_size=64, learning_rate=0.001, epochs=60, early_stopping_patience=10))
    report = data.sort_dataset(raw, config.model, validation_fraction=0.15, test_fraction=0.2, seed=3)
    record = train(config)
    return config, report, record


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
    # Chance is 0.5; a few hundred real patches at 75 px are enough for far better than that.
    assert result["balanced_accuracy"] >= 0.7 and result["roc_auc"] >= 0.8, result


def test_retraining_reuses_the_real_bottlenecks(real_project):
    config, _, _ = real_project
    again = train(config)
    assert again["bottleneck_cache"]["train"]["computed"] == 0
    assert again["bottleneck_cache"]["train"]["hits"] == 14 * 40 * len(config.classifier.train_views)


def test_unknown_feature_layer_lists_the_choices():
    require_shared(SHARED_WEIGHTS)
    with pytest.raises(WeightsError, match=r"\['mixed99'\].*mixed0, mixed1"):
        build_trunk(str(SHARED_WEIGHTS), 75, ["mixed99"])
