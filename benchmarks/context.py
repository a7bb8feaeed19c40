#!/usr/bin/env python3
r"""Slide-context rules compared on patient folds: patch-alone, the weighted mean of the neighbours
(radius and weight chosen), and the learned rule (a logistic regression over the neighbourhood), each
chosen on out-of-fold predictions and judged on patients it was not chosen on.

Reads the fold folders that `benchmarks/ablation.py --folds K --work-dir DIR` leaves (DIR/<variant>/
fold-*/reports/validation/predictions.csv: every pooled patient's P(IDC) from the one model that did
not train on them). For each fold in turn, every rule (and its threshold) is chosen on the other folds'
predictions, then applied to this fold's: so no figure comes from the patients its rule was chosen on.

  python benchmarks/ablation.py --folds 5 --variants tta --work-dir /tmp/folds
  python benchmarks/context.py /tmp/folds/tta
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import numpy as np

from idc.core import metrics
from idc.core.context import apply_rule
from idc.training.calibration import best_slide_context, best_threshold, fit_learned_context

RULES = ("patch_alone", "weighted", "learned")


def read_fold(folder: Path) -> dict:
    path = folder / "reports" / "validation" / "predictions.csv"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run benchmarks/ablation.py --folds first (see --help)")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    columns = {"patients": ("patient", str), "xs": ("x", int), "ys": ("y", int), "labels": ("label", int),
               "p": ("p_idc", float)}
    return {key: np.array([kind(r[name]) for r in rows]) for key, (name, kind) in columns.items()}


def fold_folders(variant_dir: Path) -> list[Path]:
    """An ablation variant's fold folders, in fold order."""
    return sorted(variant_dir.glob("fold-*"), key=lambda f: int(f.name.split("-")[1]))


def pooled(folds: list[dict]) -> dict:
    return {key: np.concatenate([f[key] for f in folds]) for key in folds[0]}


def choose(rule: str, data: dict) -> dict:
    where = (data["patients"], data["xs"], data["ys"], data["labels"], data["p"])
    if rule == "weighted":
        return best_slide_context(*where)
    if rule == "learned":
        return fit_learned_context(*where)
    return {"threshold": best_threshold(data["labels"], data["p"])[0]}


def answer(rule: str, chosen: dict, data: dict) -> np.ndarray:
    """Each patch's P(IDC) under the chosen rule (its own, patch alone)."""
    return data["p"] if rule == "patch_alone" else apply_rule(chosen, data["patients"], data["xs"], data["ys"], data["p"])


def judge(rule: str, chosen: dict, data: dict) -> dict:
    result = metrics.classification_metrics(data["labels"], answer(rule, chosen, data), chosen["threshold"])
    return {key: result[key] for key in ("balanced_accuracy", "f1_idc", "sensitivity", "specificity")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant_dir", type=Path, help="an ablation variant's folder holding fold-1 ... fold-K")
    args = p.parse_args()
    folders = fold_folders(args.variant_dir)
    if len(folders) < 2:
        raise SystemExit(f"{args.variant_dir} holds {len(folders)} fold folders; it needs at least 2")
    folds = [read_fold(f) for f in folders]
    print(f"{len(folds)} folds, {sum(len(f['labels']) for f in folds)} patches of "
          f"{len({x for f in folds for x in f['patients']})} patients ({args.variant_dir})")
    table = {rule: [] for rule in RULES}
    for i, held_out in enumerate(folds):
        others = pooled([f for j, f in enumerate(folds) if j != i])
        cells = []
        for rule in RULES:
            chosen = choose(rule, others)
            table[rule].append(judge(rule, chosen, held_out))
            cells.append(f"{rule} {table[rule][-1]['balanced_accuracy']:.4f}")
        print(f"  {folders[i].name} ({len(set(held_out['patients']))} patients): " + ", ".join(cells))
    print(f"\n{'rule':<12} {'bal.acc mean (sd)':>18} {'F1 mean (sd)':>16} {'sens.':>6} {'spec.':>6} "
          f"{'vs weighted, by fold':>24}")
    for rule in RULES:
        ba, f1 = ([r[k] for r in table[rule]] for k in ("balanced_accuracy", "f1_idc"))
        diff = [a["balanced_accuracy"] - b["balanced_accuracy"] for a, b in zip(table[rule], table["weighted"])]
        print(f"{rule:<12} {statistics.fmean(ba):>9.4f} ({statistics.stdev(ba):.4f}) "
              f"{statistics.fmean(f1):>8.4f} ({statistics.stdev(f1):.4f}) "
              f"{statistics.fmean(r['sensitivity'] for r in table[rule]):>6.3f} "
              f"{statistics.fmean(r['specificity'] for r in table[rule]):>6.3f} "
              f"{min(diff):>+8.4f} .. {max(diff):+.4f} (mean {statistics.fmean(diff):+.4f})")


if __name__ == "__main__":
    main()
