#!/usr/bin/env python3
r"""Does staining explain the misses? Each pooled patient's out-of-fold specificity and sensitivity
against their staining, over every patient of the patient folds (about 200, where one evaluation has
29 or 30).

Reads the fold folders that `benchmarks/ablation.py --folds K --work-dir DIR` leaves: each fold's
validation report (per_patient.csv, predictions.csv) comes from the one model that did not train on
those patients. Besides the report's own fields (mean haematoxylin, eosin and brightness of a
patient's tissue, and the stain distance), it measures each patient's benign tissue alone (their
patches labelled 0): how much IDC a patient has changes their tissue's mean colour, and a field that
goes with the IDC share is tissue, not stain, which the last lines check.

  python benchmarks/ablation.py --folds 5 --variants tta_jpeg --work-dir /tmp/folds
  python benchmarks/stain_misses.py /tmp/folds/tta_jpeg
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from idc.core.preprocessing import decode_image
from idc.training.stain import FIELDS, tissue_sums

BENIGN = ("benign haematoxylin", "benign eosin")


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def benign_staining(predictions: list[dict]) -> dict[str, list[float]]:
    """patient -> [haematoxylin, eosin] means over the tissue of their patches labelled 0."""
    sums, counts = defaultdict(lambda: np.zeros(len(FIELDS))), defaultdict(int)
    for row in predictions:
        if row["label"] == "0":
            values, count = tissue_sums(decode_image(row["file"]))
            sums[row["patient"]] += values
            counts[row["patient"]] += count
    return {patient: list(sums[patient][:2] / count) for patient, count in counts.items() if count}


def number(value: str | None) -> float:
    return float(value) if value not in (None, "", "None", "nan") else np.nan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", type=Path, help="a variant's fold folders: DIR/<variant> (fold-1, fold-2, ...)")
    args = p.parse_args()
    reports = sorted(args.variant.glob("fold-*/reports/validation"))
    if not reports:
        raise SystemExit(f"no fold-*/reports/validation under {args.variant}: run benchmarks/ablation.py --folds first")
    patients = []
    for report in reports:
        predictions = read_csv(report / "predictions.csv")
        benign = benign_staining(predictions)
        share = defaultdict(list)
        for row in predictions:
            share[row["patient"]].append(int(row["label"]))
        for row in read_csv(report / "per_patient.csv"):
            values = benign.get(row["patient"], [np.nan, np.nan])
            patients.append({**{k: number(row.get(k)) for k in ("specificity", "sensitivity", *FIELDS, "stain_distance")},
                             **dict(zip(BENIGN, values)), "IDC share": float(np.mean(share[row["patient"]]))})
    print(f"{len(patients)} patients, out of fold ({len(reports)} folds of {args.variant})")

    def rho(a: str, b: str) -> str:
        x, y = (np.array([r[k] for r in patients]) for k in (a, b))
        ok = ~np.isnan(x) & ~np.isnan(y)
        result = spearmanr(x[ok], y[ok])
        return f"{result.statistic:+.3f} (p {result.pvalue:.1g}, {ok.sum()})"

    for rate in ("specificity", "sensitivity"):
        print(f"{rate} against (Spearman rho, p, patients):")
        for field in (*FIELDS, "stain_distance", *BENIGN, "IDC share"):
            print(f"  {field:<20} {rho(rate, field)}")
    print("each staining field against the IDC share (tissue, not stain, where it goes with it):")
    for field in (*FIELDS, *BENIGN):
        print(f"  {field:<20} {rho(field, 'IDC share')}")


if __name__ == "__main__":
    main()
