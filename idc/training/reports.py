"""Evaluation reports: prediction CSVs, metrics.json and the plots (confusion matrix, ROC,
precision-recall, training curves); the slide heatmaps and index.html are in html_report."""

from __future__ import annotations

import csv
import json
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


def plot_report(report_dir: Path, labels, p_idc, threshold: float, histories: dict[str, Path]) -> list[Path]:
    """Confusion matrix, ROC, precision-recall and training curves (loss and accuracy of each
    training phase in `histories`, name -> history CSV) as PNGs."""
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
    phases = [(name, _read_history(path)) for name, path in histories.items()]
    phases = [(name, rows) for name, rows in phases if rows]
    if phases:  # the article's Figs 5-6: accuracy and loss per epoch, phase after phase
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
        for ax, metric in zip(axes, ("accuracy", "loss")):
            first = 1
            for (name, rows), colour in zip(phases, ("tab:blue", "tab:orange", "tab:green")):
                epochs = list(range(first, first + len(rows)))
                for prefix, style in (("", "-"), ("val_", "--")):
                    if prefix + metric in rows[0]:
                        ax.plot(epochs, [float(r[prefix + metric]) for r in rows], style, color=colour,
                                label=f"{name}: {'validation' if prefix else 'training'}")
                if first > 1:
                    ax.axvline(first - 0.5, color="grey", lw=0.6)
                first += len(rows)
            ax.set_xlabel("epoch")
            ax.set_title(f"Training {metric}")
            ax.legend(fontsize="small")
        save(fig, "training_curves.png")
    return written



def _read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))
