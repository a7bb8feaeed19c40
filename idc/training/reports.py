"""Evaluation reports: prediction CSVs, metrics.json and the plots (confusion matrix, ROC,
precision-recall, training curves, per-patient slide heatmaps)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np


PREDICTION_FIELDS = ["file", "patient", "x", "y", "label", "p_idc", "predicted", "needs_review"]


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    """A CSV with Unix line endings (Python's csv default, CRLF, makes grep and awk miss lines)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def save_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, default=float))


def plot_report(report_dir: Path, labels, p_idc, threshold: float, history_csv: Path | None,
                heatmap_rows: list[dict]) -> list[Path]:
    """Confusion matrix, ROC, precision-recall, training curves and per-patient heatmaps as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn import metrics as skm

    y, p = np.asarray(labels), np.asarray(p_idc)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(report_dir / name, dpi=110)
        plt.close(fig)
        written.append(report_dir / name)

    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    skm.ConfusionMatrixDisplay.from_predictions(y, (p >= threshold).astype(int), labels=[0, 1],
                                                display_labels=["no IDC (0)", "IDC (1)"], ax=ax, colorbar=False)
    ax.set_title(f"Confusion matrix (threshold {threshold})")
    save(fig, "confusion_matrix.png")
    if len(set(y.tolist())) == 2:
        fig, ax = plt.subplots(figsize=(4.2, 3.8))
        skm.RocCurveDisplay.from_predictions(y, p, ax=ax, name="IDC")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title("ROC curve")
        save(fig, "roc_curve.png")
        fig, ax = plt.subplots(figsize=(4.2, 3.8))
        skm.PrecisionRecallDisplay.from_predictions(y, p, ax=ax, name="IDC")
        ax.set_title("Precision-recall curve")
        save(fig, "precision_recall.png")
    if history_csv is not None and history_csv.exists():
        with history_csv.open() as f:
            history = list(csv.DictReader(f))
        if history:
            fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
            epochs = [int(r["epoch"]) + 1 for r in history]
            for ax, metric in zip(axes, ("accuracy", "loss")):
                for prefix, style in (("", "-"), ("val_", "--")):
                    if prefix + metric in history[0]:
                        ax.plot(epochs, [float(r[prefix + metric]) for r in history], style,
                                label=("validation " if prefix else "training ") + metric)
                ax.set_xlabel("epoch")
                ax.set_title(f"Training {metric}")
                ax.legend()
            save(fig, "training_curves.png")
    if heatmap_rows:
        save_heatmaps(report_dir, heatmap_rows, threshold, plt, save)
    return written


def save_heatmaps(report_dir, rows, threshold, plt, save, max_patients: int = 6) -> None:
    """P(IDC) laid out at each patch's slide position, beside the true labels, per patient."""
    by_patient = defaultdict(list)
    for row in rows:
        by_patient[row["patient"]].append(row)
    # The patients with the most patches show the slide best.
    chosen = sorted(by_patient, key=lambda k: -len(by_patient[k]))[:max_patients]
    fig, axes = plt.subplots(len(chosen), 2, figsize=(7, 3.2 * len(chosen)), squeeze=False)
    for (truth_ax, pred_ax), patient in zip(axes, chosen):
        items = by_patient[patient]
        xs, ys = [int(r["x"]) for r in items], [int(r["y"]) for r in items]
        for ax, values, title in ((truth_ax, [r["label"] for r in items], "true IDC"),
                                  (pred_ax, [r["p_idc"] for r in items], "P(IDC)")):
            ax.scatter(xs, ys, c=values, cmap="coolwarm", vmin=0, vmax=1, marker="s", s=18)
            ax.set_title(f"patient {patient}: {title}")
            ax.invert_yaxis()
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
    save(fig, "patient_heatmaps.png")
