#!/usr/bin/env python3
r"""The patch CNN's share of the model's answer (`patch_cnn_weight`), judged on patient folds out of fold.

Reads two variants' fold folders from `benchmarks/ablation.py --folds K --work-dir DIR`: one with the
patch CNN, and the same head without it (the same settings and seed give the same head, so each patch's
P(IDC) from the CNN alone is recovered from the two). For each share w of the CNN, P = (1 - w) P_head +
w P_CNN, and, as in benchmarks/context.py, the threshold and the weighted slide-context rule are chosen
on the other folds and judged on each fold in turn. The last lines choose w itself on the other folds
too: what choosing the share this way is worth on patients it was not chosen on.

  python benchmarks/ablation.py --folds 5 --variants tta_jpeg_mlp jpeg_mlp --work-dir /tmp/folds
  python benchmarks/ensemble_weight.py /tmp/folds/jpeg_mlp /tmp/folds/tta_jpeg_mlp
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from context import answer, choose, fold_folders, judge, pooled, read_fold  # benchmarks/context.py
from idc.core import metrics

RULES = ("patch_alone", "weighted")


def trained_weight(folder: Path) -> float:
    """The CNN's share in the fold's model (bundles from before the setting averaged: 0.5)."""
    bundle = json.loads((folder / "model.json").read_text())
    if not bundle.get("patch_cnn"):
        raise SystemExit(f"{folder} holds no patch CNN: give the variant with it first, the head alone second")
    return bundle.get("patch_cnn_weight") or 0.5


def parts(model_dir: Path, head_dir: Path) -> list[tuple[dict, np.ndarray]]:
    """Each fold's data (the head's P(IDC) as "p") with the CNN's own P(IDC)."""
    model_folders, head_folders = fold_folders(model_dir), fold_folders(head_dir)
    if len(model_folders) != len(head_folders):
        raise SystemExit(f"{model_dir} holds {len(model_folders)} folds, {head_dir} {len(head_folders)}: not the same folds")
    folds = []
    for model_folder, head_folder in zip(model_folders, head_folders):
        model, head = read_fold(model_folder), read_fold(head_folder)
        if not all((model[k] == head[k]).all() for k in ("patients", "xs", "ys", "labels")):
            raise SystemExit(f"{model_folder} and {head_folder} hold different patches: not the same folds")
        w0 = trained_weight(model_folder)
        cnn = (model["p"] - (1 - w0) * head["p"]) / w0
        if cnn.min() < -0.002 or cnn.max() > 1.002:  # beyond the predictions' rounding
            raise SystemExit(f"{head_folder}'s head is not the one in {model_folder} (the CNN's P(IDC) would leave "
                             "[0, 1]): train both variants with the same settings and seed")
        folds.append((head, np.clip(cnn, 0, 1)))
    return folds


def blend(folds: list[tuple[dict, np.ndarray]], w: float) -> list[dict]:
    return [{**head, "p": (1 - w) * head["p"] + w * cnn} for head, cnn in folds]


def out_of_fold(folds: list[dict]) -> dict:
    """Patch-alone and weighted-context figures (pooled, and each patient's own sensitivity and
    specificity), each fold judged by a rule chosen on the others; for the context rule also its
    threshold and its figure on the folds it was chosen on (to choose the share on them)."""
    result = {"auc": [], "weighted in-sample": [], "weighted threshold": [],
              **{f"{rule}{part}": [] for rule in RULES for part in ("", " sensitivity", " specificity")}}
    for i, held_out in enumerate(folds):
        others = pooled([f for j, f in enumerate(folds) if j != i])
        result["auc"].append(metrics.classification_metrics(held_out["labels"], held_out["p"], 0.5)["roc_auc"])
        for rule in RULES:
            chosen = choose(rule, others)
            p = answer(rule, chosen, held_out)
            decided = metrics.classification_metrics(held_out["labels"], p, chosen["threshold"])
            result[rule].append(decided["balanced_accuracy"])
            for row in metrics.per_patient(held_out["patients"], held_out["labels"], p, chosen["threshold"]):
                for part in ("sensitivity", "specificity"):
                    if row[part] is not None:
                        result[f"{rule} {part}"].append(row[part])
            if rule == "weighted":  # its figure and threshold where it was chosen: to choose the share on them
                result["weighted in-sample"].append(judge(rule, chosen, others)["balanced_accuracy"])
                result["weighted threshold"].append(chosen["threshold"])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, help="the variant with the patch CNN (holding fold-1 ... fold-K)")
    p.add_argument("head_dir", type=Path, help="the same variant without the patch CNN (the same folds)")
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="the CNN's shares to judge (0: the head alone, 1: the CNN alone)")
    args = p.parse_args()
    if len(fold_folders(args.model_dir)) < 2:
        raise SystemExit(f"{args.model_dir} holds fewer than 2 fold folders: run benchmarks/ablation.py --folds first")
    folds = parts(args.model_dir, args.head_dir)
    print(f"{len(folds)} folds, {sum(len(h['labels']) for h, _ in folds)} patches "
          f"({args.model_dir} against {args.head_dir})")
    print(f"\n{'CNN share':>9} {'AUC':>7} {'patch alone':>11} {'per patient':>13} {'+ context':>9} {'per patient':>13}  "
          "+ context by fold\n" + " " * 30 + f"{'sens/spec':>13}" + " " * 11 + f"{'sens/spec':>13}")
    results = {}
    for w in args.weights:
        r = results[w] = out_of_fold(blend(folds, w))
        mean = {key: statistics.fmean(values) for key, values in r.items()}
        print(f"{w:>9.2f} {mean['auc']:>7.4f} {mean['patch_alone']:>11.4f} "
              f"{mean['patch_alone sensitivity']:>6.4f}/{mean['patch_alone specificity']:.4f} {mean['weighted']:>9.4f} "
              f"{mean['weighted sensitivity']:>6.4f}/{mean['weighted specificity']:.4f}  "
              + " ".join(f"{x:.4f}" for x in r["weighted"]))
    print("\ncontext thresholds chosen on the other folds: " + "; ".join(
        f"{w:g}: " + " ".join(f"{t:g}" for t in r["weighted threshold"]) for w, r in results.items()))
    # The share itself chosen on the other folds (the best there, with its rule), judged on each fold.
    nested = [max(args.weights, key=lambda w: results[w]["weighted in-sample"][i]) for i in range(len(folds))]
    print("the share chosen on the other folds: " + ", ".join(
        f"fold {i + 1} {w:g} -> {results[w]['weighted'][i]:.4f}" for i, w in enumerate(nested))
        + f"; mean {statistics.fmean(results[w]['weighted'][i] for i, w in enumerate(nested)):.4f}")

if __name__ == "__main__":
    main()
