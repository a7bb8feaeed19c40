"""The IDC patch dataset: parse, split by PATIENT, balance, and sort into the training layout.

Kaggle layout: <patient>/<class>/<patient>_idx5_x<X>_y<Y>_class<C>.png (a flat folder of such
files works too). Patches of one patient are strongly correlated, so every split is by
patient: a patch split (what the 2018 original did) leaks and inflates every figure.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from idc.core.bundle import MANIFEST_FIELDS, SPLITS, ModelDir, Patch, parse_patch_name
from idc.core.errors import DatasetError, ImageError, ImageTooLargeError
from idc.core.files import FORMAT_NAMES, IMAGE_FORMATS
from idc.core.preprocessing import decode_image

log = logging.getLogger(__name__)

DATASET_HELP = (
    "Get the public dataset 'Breast Histopathology Images' (IDC_regular_ps50_idx5, CC0) from "
    "https://www.kaggle.com/datasets/paultimothymooney/breast-histopathology-images "
    "(or http://andrewjanowczyk.com/use-case-6-invasive-ductal-carcinoma-idc-segmentation/), "
    "unpack it, and set ClassifierSettings.dataset_dir in confs.json or pass --data DIR."
)
# Why a file is skipped, as counted in the report. Hidden/system files (.DS_Store, ._* from macOS,
# Thumbs.db) are harmless clutter: counted and listed like the rest, but grouped apart and listed last.
NOT_A_PATCH = "not named like an IDC patch"
SYSTEM_FILE = "hidden or system file"
WRONG_FOLDER = "in a class folder other than 0/1"
CLASS_MISMATCH = "class folder disagrees with its name"
TOO_LARGE = "far larger than a patch"
UNREADABLE = "unreadable or corrupt"
REASONS = (NOT_A_PATCH, WRONG_FOLDER, CLASS_MISMATCH, TOO_LARGE, UNREADABLE, SYSTEM_FILE)  # the table's order
PATCH_SIDE = 50  # the dataset's patches are 50x50 px; edge patches are smaller


def scan_dataset(root: str | Path, report: SortReport | None = None) -> list[Patch]:
    """All IDC patches under `root` (Kaggle layout or flat), sorted for reproducibility.
    Every other file is recorded in `report` with the reason, so that nothing is dropped unseen."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist. {DATASET_HELP}")
    report = report if report is not None else SortReport()
    patches = []
    found = tqdm(root.rglob("*"), desc="scanning", unit=" entries", leave=False)  # slow on a network file system
    for path in sorted(p for p in found if p.is_file()):
        patch = parse_patch_name(path)
        folder = path.parent
        # Kaggle layout: <patient>/<class>/file; a folder named 0 or 1 is a class folder anywhere.
        # Files directly in root or in any other folder are a flat layout and stay valid.
        in_class_folder = folder != root and patch is not None and (folder.parent.name == patch.patient
                                                                    or folder.name in ("0", "1"))
        if any(part.startswith(".") for part in path.relative_to(root).parts) or \
                path.name.lower() in ("thumbs.db", "desktop.ini"):
            report.skip(path, SYSTEM_FILE)
        elif patch is None:
            report.skip(path, NOT_A_PATCH)
        elif in_class_folder and folder.name not in ("0", "1"):
            report.skip(path, WRONG_FOLDER, f"in folder {folder.name}/, not a class folder 0/ or 1/")
        elif in_class_folder and folder.name != str(patch.label):
            report.skip(path, CLASS_MISMATCH, f"in class folder {folder.name}/ but named class{patch.label}")
        else:
            patches.append(patch)
    if not patches:
        raise DatasetError(f"no IDC patches (<patient>_idx5_x<X>_y<Y>_class<C>.png) under {root}. {DATASET_HELP}")
    return patches


def read_patients_file(path: str | Path, split_names: dict[str, str]) -> dict[str, str]:
    """patient -> split, from a CSV with columns patient_id and reference_split (or split).

    `split_names` maps the file's split names to ours (e.g. {"val": "test"}).
    """
    path = Path(path)
    try:
        rows = list(csv.DictReader(path.open(newline="")))
    except FileNotFoundError:
        raise DatasetError(f"patients file {path} does not exist") from None
    column = "reference_split" if rows and "reference_split" in rows[0] else "split"
    if not rows or "patient_id" not in rows[0] or column not in rows[0]:
        raise DatasetError(f"patients file {path} needs columns patient_id and reference_split (or split)")
    unknown = {row[column] for row in rows} - set(split_names)
    if unknown:
        raise DatasetError(f"patients file {path} uses splits {sorted(unknown)} that patients_file_splits does not map")
    return {row["patient_id"]: split_names[row[column]] for row in rows}


def patient_split(patients: list[str], validation_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, str]:
    """Assign whole patients to train/validation/test with a seeded shuffle."""
    order = sorted(set(patients))
    random.Random(seed).shuffle(order)
    n_val = round(len(order) * validation_fraction)
    n_test = round(len(order) * test_fraction)
    assignment = {p: "test" for p in order[:n_test]}
    assignment.update({p: "validation" for p in order[n_test:n_test + n_val]})
    assignment.update({p: "train" for p in order[n_test + n_val:]})
    return assignment


def assign_splits(patches: list[Patch], *, validation_fraction: float, test_fraction: float, seed: int,
                  patients_file: dict[str, str] | None = None) -> dict[str, list[Patch]]:
    """Patches grouped by split. With a patients file, its 'train' patients are further split
    into train and validation (by patient) so that early stopping never sees the test patients."""
    patients = [p.patient for p in patches]
    if patients_file is None:
        assignment = patient_split(patients, validation_fraction, test_fraction, seed)
    else:
        assignment = {p: patients_file.get(p, "unlisted") for p in set(patients)}
        unlisted = sorted(p for p, s in assignment.items() if s == "unlisted")
        if unlisted:
            log.warning("%d patients are not in the patients file and are left out: %s",
                        len(unlisted), ", ".join(unlisted[:10]) + (" ..." if len(unlisted) > 10 else ""))
        train = [p for p, s in assignment.items() if s == "train"]
        if validation_fraction and not any(s == "validation" for s in assignment.values()):
            assignment.update(patient_split(train, validation_fraction, 0.0, seed))
    groups: dict[str, list[Patch]] = {split: [] for split in SPLITS}
    for patch in patches:
        split = assignment[patch.patient]
        if split in groups:
            groups[split].append(patch)
    return groups


def balance(patches: list[Patch], per_class: int | str, seed: int) -> list[Patch]:
    """At most `per_class` patches of each class, drawn at random ("all" keeps everything)."""
    if per_class == "all":
        return patches
    rng = random.Random(seed)
    kept = []
    for label in (0, 1):
        of_class = [p for p in patches if p.label == label]
        if len(of_class) < per_class:
            log.warning("only %d training patches of class %d (asked for %d)", len(of_class), label, per_class)
        kept += sorted(rng.sample(of_class, min(per_class, len(of_class))), key=lambda p: str(p.path))
    return kept


@dataclass
class SortReport:
    counts: dict[str, Counter] = field(default_factory=dict)  # split -> label -> patches
    patients: dict[str, int] = field(default_factory=dict)  # split -> patients
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    reasons: Counter = field(default_factory=Counter)  # category (NOT_A_PATCH, ...) -> files skipped
    small: int = 0  # kept patches under PATCH_SIDE px on a side: edge patches, normal, padded white
    linked: int = 0  # sorted patches hard-linked to the dataset's file: no bytes copied, no space used
    copied: int = 0  # sorted patches copied: another file system, or links not permitted there
    link_refused: str | None = None  # why the first copy could not be a link (e.g. "Invalid cross-device link")
    manifest: Path | None = None

    def skip(self, path: str | Path, category: str, why: str | None = None) -> None:
        self.skipped.append((str(path), why or category))
        self.reasons[category] += 1

    def table(self) -> str:
        lines = [f"{'split':<11}{'patients':>9}{'class 0':>9}{'class 1':>9}{'total':>8}"]
        for split in SPLITS:
            c = self.counts.get(split, Counter())
            lines.append(f"{split:<11}{self.patients.get(split, 0):>9}{c[0]:>9}{c[1]:>9}{c[0] + c[1]:>8}")
        lines.append(f"patches under {PATCH_SIDE} px on a side (edge patches, kept): {self.small}")
        lines.append(f"sorted files: {self.linked} hard links to the dataset's files, {self.copied} copies"
                     + (f" (hard link refused: {self.link_refused})" if self.link_refused else ""))
        why = ", ".join(f"{self.reasons[r]} {r}" for r in REASONS if self.reasons[r])
        lines.append(f"skipped: {len(self.skipped)}" + (f" ({why})" if why else ""))
        lines += [f"  {name}: {why}" for name, why in self.skipped[:20]]
        if len(self.skipped) > 20:
            lines.append(f"  ... and {len(self.skipped) - 20} more (see the manifest folder's skipped.csv)")
        return "\n".join(lines)


def sort_dataset(dataset_dir: str | Path, model: ModelDir, *, validation_fraction: float,
                 test_fraction: float, seed: int, samples_per_class: int | str = "all",
                 patients_file: dict[str, str] | None = None) -> SortReport:
    """Place the dataset's patches in the model directory's {train,validation,test}/{0,1}, write manifest.csv
    and the example images test/positive.png and test/negative.png. Every file not sorted (not a patch, in the
    wrong class folder, far too large, corrupt) is counted in the report and listed in skipped.csv with the
    reason. Patches are hard-linked where the file system allows (no bytes copied, no extra space), else
    copied; the report counts each. One image is read at a time: memory grows with the number of paths only."""
    report = SortReport()
    groups = assign_splits(scan_dataset(dataset_dir, report), validation_fraction=validation_fraction,
                           test_fraction=test_fraction, seed=seed, patients_file=patients_file)
    groups["train"] = balance(groups["train"], samples_per_class, seed)
    for split in SPLITS:  # a re-sort replaces the previous one, never mixes with it
        shutil.rmtree(model.split_dir(split), ignore_errors=True)

    rows = []
    total = sum(len(g) for g in groups.values())
    with tqdm(total=total, desc="sorting", unit="patch") as progress:
        for split, patches in groups.items():
            for patch in patches:
                progress.update()
                try:  # validates the file; max_side refuses a huge image from its header, before decoding
                    height, width = decode_image(patch.path, max_side=2 * PATCH_SIDE).shape[:2]
                except ImageTooLargeError as err:  # not a patch of this dataset: training would downscale it
                    report.skip(patch.path, TOO_LARGE, _too_large(patch.path, err))
                    continue
                except ImageError as err:
                    report.skip(patch.path, UNREADABLE, _unreadable(err))
                    continue
                report.small += min(height, width) < PATCH_SIDE
                target = model.split_dir(split) / str(patch.label) / patch.path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                refused = _link_or_copy(patch.path, target)
                if refused is None:
                    report.linked += 1
                else:
                    report.copied += 1
                    report.link_refused = report.link_refused or refused
                rows.append((split, str(target.relative_to(model.root)), str(patch.path), patch.patient,
                             patch.x, patch.y, patch.label))
    for split in SPLITS:
        kept = [r for r in rows if r[0] == split]
        report.counts[split] = Counter(r[6] for r in kept)
        report.patients[split] = len({r[3] for r in kept})

    report.skipped.sort(key=lambda s: (s[1] == SYSTEM_FILE, s[0]))  # clutter last in the examples
    report.manifest = model.manifest
    with report.manifest.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(MANIFEST_FIELDS)
        writer.writerows(rows)
    with model.skipped.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("file", "why"), *report.skipped])
    _write_examples(rows, model, seed)
    return report


def _link_or_copy(source: Path, target: Path) -> str | None:
    """Hard-link `source` at `target` (None), or copy it where the link is refused (the reason).

    A link shares the dataset file's bytes, so nothing may write through a sorted file: an existing target
    (a second patch of the same name, or what a failed clean-up left) is replaced, never overwritten."""
    try:
        os.link(source, target)
        return None
    except FileExistsError:
        target.unlink()
        return _link_or_copy(source, target)
    except OSError as err:  # EXDEV: another file system; EPERM: e.g. another user's file; or no hard links at all
        target.unlink(missing_ok=True)  # some systems check the file system before the name
        shutil.copyfile(source, target)
        return err.strerror or str(err)


def _too_large(path: Path, err: ImageTooLargeError) -> str:
    try:  # the header only: cheap
        with Image.open(path) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001  e.g. a decompression bomb, refused even from the header
        return f"{err}, far from the dataset's {PATCH_SIDE}x{PATCH_SIDE} patches"
    return f"{width}x{height} px, far from the dataset's {PATCH_SIDE}x{PATCH_SIDE} patches"


def _unreadable(err: ImageError) -> str:
    """decode_image words its errors for the HTTP API ("send PNG, ... bytes"): reword for a dataset."""
    message = str(err)
    if message.startswith("not an image"):
        message = f"not a {FORMAT_NAMES} image (corrupt or another format)"
    return f"unreadable: {message}"


def _write_examples(rows, model: ModelDir, seed: int) -> None:
    """test/positive.png and test/negative.png: one patch of each class from TEST patients
    (the 2018 original published a training image as its positive example)."""
    test_rows = [r for r in rows if r[0] == "test"]
    rng = random.Random(seed)
    for label in (1, 0):
        candidates = [r for r in test_rows if r[6] == label]
        if not candidates:
            log.warning("no class-%d test patch: %s not written", label, model.example(label))
            continue
        shutil.copyfile(model.root / rng.choice(candidates)[1], model.example(label))


def add_extra_labels(csv_path: str | Path, model: ModelDir) -> tuple[int, list[str]]:
    """Add the labelled patches of a review station export (idc.core.review_export) to the sorted training
    split: each image is written to train/<label>/review_<sha256[:12]>.<ext> and listed in the manifest.
    Patches of a validation or test patient are left out (they would leak into training), and so are
    patches already added or unreadable. Returns (patches added, why each other one was left out)."""
    from idc.core.review_export import read_csv

    patches = read_csv(csv_path)
    rows = model.read_manifest()  # raises DatasetError (run sort first) when there is no manifest
    held_out = {p.patient for split in ("validation", "test") for p in model.read_manifest(split)}
    known = {p.path.name for p in rows}
    added, left_out = [], []
    for patch in patches:
        patient = patch.patient or f"review-{patch.sha256[:12]}"
        name = f"review_{patch.sha256[:12]}.{IMAGE_FORMATS[patch.format].extension if patch.format in IMAGE_FORMATS else 'png'}"
        if patient in held_out:
            left_out.append(f"{csv_path} id {patch.id}: patient {patient} is a validation/test patient")
            continue
        if name in known:
            left_out.append(f"{csv_path} id {patch.id}: already added")
            continue
        try:
            decode_image(patch.image, max_side=2 * PATCH_SIDE)
        except ImageError as err:
            left_out.append(f"{csv_path} id {patch.id}: {err}")
            continue
        target = model.split_dir("train") / str(patch.label) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(patch.image)
        known.add(name)
        added.append(("train", str(target.relative_to(model.root)), f"{csv_path}#{patch.id}", patient,
                      patch.x or 0, patch.y or 0, patch.label))
    with model.manifest.open("a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(added)
    return len(added), left_out
