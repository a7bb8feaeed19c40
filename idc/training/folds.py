"""Patient-level k-fold cross-validation over the training patients, to choose settings on many
patients instead of the 30 validation patients alone (one of them holds 44 % of their patches).

The pool is the sorted split's training and validation patients (the test patients stay out of
every fold). Each fold's patients are its validation patients: never trained on in that fold, used
there for early stopping and the decision rule, and evaluated. Folds are balanced by patches and
patients: patients in a seeded order, the largest first, each to the fold with the fewest patches
so far (then the fewest patients). A fold is a model folder of its own whose manifest re-labels
the splits; the sorted patches and the bottleneck cache are the source folder's (symlinks), so the
folds share one cache and a view is computed once for all of them.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np

from idc.core.errors import DatasetError

POOL = ("train", "validation")  # the splits the folds are drawn from; "test" stays as it is
SHARED = ("train", "validation", "test", "bottlenecks")  # linked from the source model folder


def patient_folds(patients: list[str], k: int, seed: int = 42) -> list[list[str]]:
    """`patients` (one entry per patch) split into k groups of whole patients, balanced by patches."""
    counts = Counter(patients)
    if not 2 <= k <= len(counts):
        raise DatasetError(f"cannot make {k} folds of {len(counts)} patients: k must be 2 to {len(counts)}")
    order = sorted(counts)
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    order.sort(key=lambda patient: -counts[patient])  # stable: the seeded order among equals
    folds: list[list[str]] = [[] for _ in range(k)]
    sizes = [0] * k
    for patient in order:
        smallest = min(range(k), key=lambda i: (sizes[i], len(folds[i])))
        folds[smallest].append(patient)
        sizes[smallest] += counts[patient]
    return [sorted(fold) for fold in folds]


def read_pool(manifest: Path) -> tuple[list[str], list[dict]]:
    """(the patient of each pooled patch, every manifest row)."""
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [row["patient"] for row in rows if row["split"] in POOL], rows


def write_fold(source: Path, folder: Path, held_out: set[str]) -> Path:
    """A model folder for one fold: `held_out` patients as its validation split, the rest of the
    pool as training, the test split unchanged; the patches and the cache are `source`'s."""
    _, rows = read_pool(source / "manifest.csv")
    folder.mkdir(parents=True, exist_ok=True)
    (source / "bottlenecks").mkdir(exist_ok=True)  # a fresh sort has no cache yet: the folds still share one
    for name in SHARED:
        if not (folder / name).exists() and (source / name).exists():
            (folder / name).symlink_to((source / name).resolve())
    for row in rows:
        if row["split"] in POOL:
            row["split"] = "validation" if row["patient"] in held_out else "train"
    path = folder / "manifest.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_folds(source: Path, work: Path, k: int, seed: int = 42) -> list[Path]:
    """k fold folders under `work` (fold-1 ... fold-k) from the sorted model folder `source`."""
    manifest = source / "manifest.csv"
    if not manifest.exists():
        raise DatasetError(f"{manifest} does not exist: run `python trainer.py sort` first")
    patients, _ = read_pool(manifest)
    return [write_fold(source, work / f"fold-{i + 1}", set(fold)).parent
            for i, fold in enumerate(patient_folds(patients, k, seed))]
