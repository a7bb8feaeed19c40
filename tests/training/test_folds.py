"""Patient-level k-fold cross-validation (idc.training.folds): whole patients, balanced, and a fold
folder that trains on the shared cache with its patients held out."""

import csv
import json
from collections import Counter
from pathlib import Path

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


def test_folds_of_a_fresh_sort_share_one_cache(tiny_project, tmp_path):
    """Sorted, never trained (no bottlenecks folder yet): the folds still share the source's cache."""
    import shutil

    config, _ = tiny_project
    source = tmp_path / "fresh"
    source.mkdir()
    shutil.copy(config.model.root / "manifest.csv", source / "manifest.csv")
    made = folds.make_folds(source, tmp_path / "folds", 3)
    assert (source / "bottlenecks").is_dir()
    assert all((folder / "bottlenecks").resolve() == (source / "bottlenecks").resolve() for folder in made)


def test_fold_jobs_are_prepared_run_one_a_task_and_collected(tiny_project, tmp_path):
    """The cluster path: `ablation.py --fold-jobs prepare` writes the folds, examples/cluster/folds_job.sh
    runs the Nth as one array task, `--fold-jobs collect` summarises what the jobs left."""
    import subprocess
    import sys

    from tests.paths import ROOT

    config, _ = tiny_project
    work = tmp_path / "folds"
    ablation = [sys.executable, str(ROOT / "benchmarks" / "ablation.py"), "--config", str(config.path),
                "--model-dir", str(config.model.root), "--folds", "3", "--variants", "tta", "tta_slide",
                "--work-dir", str(work)]
    done = subprocess.run([*ablation, "--fold-jobs", "prepare"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = [line for line in done.stdout.splitlines() if line.endswith("confs.json")]
    assert len(listed) == 6 and all(json.loads(open(c).read())["ClassifierSettings"]["model_dir"] in c for c in listed)
    assert json.loads(open(listed[3]).read())["ClassifierSettings"]["stain_normalization"] == "slide"

    job = ROOT / "examples" / "cluster" / "folds_job.sh"
    env = {"PATH": "/usr/bin:/bin", "SLURM_SUBMIT_DIR": str(ROOT), "FOLDS": str(work), "IDC_DRY_RUN": "1"}
    commands = []
    for task in range(1, 7):
        out = subprocess.run(["bash", str(job)], env={**env, "SLURM_ARRAY_TASK_ID": str(task)}, capture_output=True,
                             text=True, timeout=60, check=True).stdout.splitlines()
        assert [line.split()[2] for line in out] == ["trainer.py", "evaluate.py"] and out[1].endswith("--split validation")
        commands.append(out[0].split("--config ")[1])
    assert sorted(commands) == sorted(listed)  # each fold once
    beyond = subprocess.run(["bash", str(job)], env={**env, "SLURM_ARRAY_TASK_ID": "7"}, capture_output=True, text=True)
    assert beyond.returncode == 2 and "--array=1-6" in beyond.stderr

    unfinished = subprocess.run([*ablation, "--fold-jobs", "collect"], capture_output=True, text=True, timeout=120)
    assert unfinished.returncode != 0 and "has not finished" in unfinished.stderr
    for i, conf in enumerate(listed):  # what each job leaves: training.json and the validation metrics
        folder = Path(conf).parent
        (folder / "training.json").write_text(json.dumps({"seconds": 60 + i}))
        (folder / "reports" / "validation").mkdir(parents=True)
        (folder / "reports" / "validation" / "metrics.json").write_text(json.dumps({
            "balanced_accuracy": 0.8 + 0.01 * i, "f1_idc": 0.7, "roc_auc": 0.9, "patients": 2,
            "intervals_95": {"balanced_accuracy": [0.7, 0.9]}}))
        # Two patients: one with IDC (sensitivity 0.5 + 0.1 i), one without (no sensitivity, specificity 0.9).
        (folder / "reports" / "validation" / "per_patient.csv").write_text(
            f"patient,sensitivity,specificity\na,{0.5 + 0.1 * i:.1f},0.7\nb,,0.9\n")
    done = subprocess.run([*ablation, "--fold-jobs", "collect"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    table = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.startswith("tta")}
    assert table["tta"][1:4] == ["3", "0.8100", "(0.0100)"] and table["tta"][8] == "183"
    # The mean over each fold's patients, then over the folds: the patient without IDC has no sensitivity.
    assert table["tta"][7] == "0.6000/0.8000" and table["tta_slide"][7] == "0.9000/0.8000"
    assert table["tta_slide"][2] == "0.8400"
