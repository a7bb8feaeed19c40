#!/usr/bin/env python3
r"""How much of an evaluation's balanced accuracy is the threshold's doing: the figure at the threshold
the model chose on its validation patients, beside the best that any threshold gives on the same
patients, patch alone and with the model's slide-context rule.

For reading only. The best threshold is picked on the very patients it is reported on, so it is an
upper bound for this model's ranking, never a setting to use. When the chosen threshold is close to it,
a better figure needs a better ranking (a higher ROC AUC), not another threshold.

  python evaluate.py                       # writes model/reports/test
  python benchmarks/threshold_headroom.py model/reports/test
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from idc.core import metrics
from idc.core.context import apply_rule

GRID = np.round(np.arange(0.01, 1.0, 0.005), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", type=Path, help="a report folder of evaluate.py (predictions.csv, metrics.json)")
    args = p.parse_args()
    with (args.report / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    chosen = json.loads((args.report / "metrics.json").read_text())
    labels = np.array([int(r["label"]) for r in rows])
    p_idc = np.array([float(r["p_idc"]) for r in rows])
    rules = [("patch alone", p_idc, chosen["threshold"])]
    if chosen.get("slide_context"):
        context = chosen["slide_context"]
        blended = apply_rule(context, [r["patient"] for r in rows], np.array([int(r["x"]) for r in rows]),
                             np.array([int(r["y"]) for r in rows]), p_idc)
        rules.append(("with slide context", blended, context["threshold"]))
    print(f"{args.report}: {len(rows)} patches")
    for name, scores, threshold in rules:
        at = [metrics.classification_metrics(labels, scores, t) for t in GRID]
        best = max(range(len(GRID)), key=lambda i: at[i]["balanced_accuracy"])
        here = metrics.classification_metrics(labels, scores, threshold)
        print(f"  {name:<18} ROC AUC {here['roc_auc']:.4f}; balanced accuracy {here['balanced_accuracy']:.4f} "
              f"(F1 {here['f1_idc']:.4f}) at the chosen threshold {threshold}; at most "
              f"{at[best]['balanced_accuracy']:.4f} (F1 {at[best]['f1_idc']:.4f}) at any threshold ({GRID[best]})")


if __name__ == "__main__":
    main()
