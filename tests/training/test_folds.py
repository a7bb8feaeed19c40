"""Patient-level k-fold cross-validation (idc.training.folds): whole patients, balanced, and a fold
folder that trains on the shared cache with its patients held out."""

import csv
import json
from collections import Counter

import pytest

from idc.core.config import load_config
from idc.core.errors import DatasetError
from idc.training import folds
from idc.training.train import train
from tests.synthetic import tiny_trunk, write_config


def test_folds_are_whole_patients_balanced_by_patches_and_seeded():
    # 40 patients of 1 to 351 patches, five of each size (one patch per list entry)
    sizes = {f"p{i}": 1 + (i % 8) * 50 for i in range(40)}
    patients = [patient for patient, n in sizes.items() for _ in range(n)]
    made = folds.patient_folds(patients, 5, seed=1)
    assert sorted(p for fold in made for p in fold) == sorted(sizes)  # every patient, in exactly one fold
    patches = [sum(sizes[p] for p in fold) for fold in made]
    assert max(patches) - min(patches) <= max(sizes.values())  # greedy: within one patient's patches
    assert max(len(f) for f in made) - min(len(f) for f in made) <= 4
    assert made == folds.patient_folds(patients, 5, seed=1) != folds.patient_folds(patients, 5, seed=2)
    with pytest.raises(DatasetError, match="cannot make 41 folds of 40 patients"):
        folds.patient_folds(patients, 41)


def rows(manifest):
    with manifest.open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_fold_holds_out_its_patients_keeps_the_test_split_and_trains(tiny_project, tmp_path):
    config, _ = tiny_project
    source = config.model.root
    made = folds.make_folds(source, tmp_path / "folds", 4, seed=3)
    original = rows(source / "manifest.csv")
    pool = {r["patient"] for r in original if r["split"] in ("train", "validation")}
    held_out = []
    for folder in made:
        fold = rows(folder / "manifest.csv")
        assert [(r["file"], r["patient"]) for r in fold] == [(r["file"], r["patient"]) for r in original]
        assert [r for r in fold if r["split"] == "test"] == [r for r in original if r["split"] == "test"]
        validation = {r["patient"] for r in fold if r["split"] == "validation"}
        assert not validation & {r["patient"] for r in fold if r["split"] == "train"}
        held_out.append(validation)
        assert (folder / "bottlenecks").resolve() == (source / "bottlenecks").resolve()
    assert set().union(*held_out) == pool and sum(map(len, held_out)) == len(pool)  # each pooled patient once

    # The first fold trains in its own folder on the source's sorted patches and cache.
    fold_config = load_config(write_config(tmp_path, dataset_dir=str(config.classifier.dataset_dir),
                                           model_dir=str(made[0])))
    record = train(fold_config, trunk=tiny_trunk())
    saved = json.loads((made[0] / "training.json").read_text())
    assert saved["data"]["validation"]["patients"] == len(held_out[0])
    assert saved["data"]["train"]["patients"] == len(pool) - len(held_out[0])
    # The tiny project computed its training patients' views and its validation patients' identity
    # view: only the other views of the patients new to training are computed.
    new_to_training = Counter(r["patient"] for r in original if r["split"] == "validation" and r["patient"] not in held_out[0])
    views = len(fold_config.classifier.train_views)
    assert record["bottleneck_cache"]["train"]["computed"] == (views - 1) * sum(new_to_training.values()) > 0
    assert (made[0] / "DevCloudIDC.keras").exists()
