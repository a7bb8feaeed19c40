"""Evaluate the trained model on held-out patients (a sorted split or any Kaggle-layout folder)."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import numpy as np

from idc import data, metrics
from idc.config import Config
from idc.errors import ImageError, ModelNotFoundError
from idc.preprocessing import decode_image, preprocess

log = logging.getLogger(__name__)


def load_keras_model(path: Path):
    import keras

    import idc.model  # noqa: F401  (registers the custom layers the saved model uses)

    if not path.exists():
        raise ModelNotFoundError(f"no trained model at {path}: run `python trainer.py train` first")
    return keras.models.load_model(path, compile=False)


def predict_patches(model, patches: list[data.Patch], image_size: int, batch_size: int,
                    print_every: int = 10, echo=print):
    """P(IDC) for each readable patch, printing the article's streaming accuracy lines.

    Returns (kept patches, probabilities, skipped [(file, why)])."""
    kept, probabilities, skipped = [], [], []
    correct = seen = 0
    steps = (len(patches) + batch_size - 1) // batch_size
    for step in range(steps):
        started = time.perf_counter()
        images, batch = [], []
        for patch in patches[step * batch_size:(step + 1) * batch_size]:
            try:
                images.append(decode_image(patch.path))
                batch.append(patch)
            except ImageError as err:
                skipped.append((str(patch.path), str(err)))
        if not batch:
            continue
        p = np.asarray(model.predict_on_batch(preprocess(images, image_size)))[:, 1]
        labels = np.array([x.label for x in batch])
        correct += int(((p >= 0.5) == labels).sum())
        seen += len(batch)
        kept += batch
        probabilities.append(p)
        if (step + 1) % print_every == 0 or step == steps - 1:
            echo(f"Global Step {step + 1}: Streaming Accuracy: {correct / seen:.4f} "
                 f"({time.perf_counter() - started:.2f} sec/step)")
    echo(f"Final Streaming Accuracy: {correct / max(seen, 1):.4f}")
    return kept, (np.concatenate(probabilities) if probabilities else np.zeros(0)), skipped


def evaluate(config: Config, split: str = "test", data_dir: str | Path | None = None,
             report_dir: str | Path | None = None, echo=print) -> dict:
    """Run the exported model on a split (or --data folder) and write the full report."""
    settings = config.classifier
    if data_dir is not None:
        patches, name = data.scan_dataset(data_dir), Path(data_dir).name
    else:
        patches, name = data.read_manifest(config.model_dir, split), split
    if not patches:
        raise ModelNotFoundError(f"the {split!r} split is empty: nothing to evaluate")
    report_dir = Path(report_dir) if report_dir else config.model_dir / "reports" / name
    report_dir.mkdir(parents=True, exist_ok=True)

    from idc.training import model_path

    model = load_keras_model(model_path(config))
    kept, p, skipped = predict_patches(model, patches, settings.image_size, settings.batch_size, echo=echo)
    labels = np.array([x.label for x in kept])
    threshold = settings.InceptionThreshold
    predicted, review = metrics.decide(p, threshold, settings.review_band)
    result = metrics.classification_metrics(labels, p, threshold)
    patients = metrics.per_patient([x.patient for x in kept], labels, p, threshold)
    false_negatives = (labels == 1) & (predicted == 0)
    result.update({
        "evaluated_on": name, "patients": len(patients), "skipped": len(skipped),
        "needs_review": int(review.sum()),
        # the article's second stage: how many of the missed IDC patches a human would still see
        "false_negatives_flagged_for_review": int((false_negatives & review).sum()),
        "streaming_accuracy_at_0.5": float(((p >= 0.5) == labels).mean()),
    })

    rows = [{"file": str(x.path), "patient": x.patient, "x": x.x, "y": x.y, "label": x.label,
             "p_idc": round(float(pi), 6), "predicted": int(pr), "needs_review": bool(rv)}
            for x, pi, pr, rv in zip(kept, p, predicted, review)]
    metrics.write_predictions(report_dir / "predictions.csv", rows)
    for name, label in (("false_negatives.csv", 1), ("false_positives.csv", 0)):
        metrics.write_predictions(report_dir / name, [r for r in rows if r["label"] == label and r["predicted"] != label])
    with (report_dir / "per_patient.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(patients[0]))
        writer.writeheader()
        writer.writerows(patients)
    metrics.save_json(report_dir / "metrics.json", result)
    history = config.model_dir / "history_head.csv"
    plots = metrics.plot_report(report_dir, labels, p, threshold, history, rows)
    _log_to_tensorboard(config.model_dir / "logs" / f"evaluation_{name}", result)

    echo(summary(result))
    if skipped:
        echo(f"skipped {len(skipped)} unreadable images, e.g. {skipped[0][0]}: {skipped[0][1]}")
    echo(f"report: {report_dir} ({len(plots)} plots, predictions.csv, metrics.json)")
    return result


def summary(result: dict) -> str:
    cm = result["confusion_matrix"]
    names = ["accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1_idc", "roc_auc"]
    lines = [f"Evaluated {result['patches']} patches of {result['patients']} patients "
             f"({result['evaluated_on']}) at threshold {result['threshold']}:"]
    lines += [f"  {n:<18} {result[n]:.4f}" for n in names]
    lines.append(f"  confusion matrix   TN {cm['tn']}  FP {cm['fp']}  FN {cm['fn']}  TP {cm['tp']}")
    lines.append(f"  needs review       {result['needs_review']} patches, holding "
                 f"{result['false_negatives_flagged_for_review']} of the {cm['fn']} false negatives")
    return "\n".join(lines)


def _log_to_tensorboard(log_dir: Path, result: dict) -> None:
    import tensorflow as tf

    with tf.summary.create_file_writer(str(log_dir)).as_default():
        for key, value in result.items():
            if isinstance(value, float) and np.isfinite(value):
                tf.summary.scalar(f"evaluation/{key}", value, step=0)
