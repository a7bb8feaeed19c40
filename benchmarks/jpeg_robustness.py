#!/usr/bin/env python3
"""How a model reads JPEG: balanced accuracy (95 % bootstrap interval over patients) and ROC AUC of each
config's Keras model on its VALIDATION patients' PNG patches and on the same patches after a JPEG round
trip at quality 90 and 70 with 4:2:0 chroma (what slide scanners store), at the model's own
validation-chosen threshold. Validation patients only: this is what chooses the JPEG training view.

  python benchmarks/jpeg_robustness.py confs.json /tmp/ablation/jpeg/confs.json
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from idc.core import metrics
from idc.core.config import load_config
from idc.core.preprocessing import decode_image
from idc.edge.engine import load_classifier

QUALITIES = (90, 70)
ROUNDS = 300  # bootstrap rounds over patients


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality, subsampling=2)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def interval(y, p, patients, threshold, rng) -> np.ndarray:
    ids, values = np.unique(patients), []
    for _ in range(ROUNDS):
        picked = np.concatenate([np.flatnonzero(patients == i) for i in rng.choice(ids, len(ids))])
        if len(np.unique(y[picked])) == 2:
            values.append(metrics.classification_metrics(y[picked], p[picked], threshold)["balanced_accuracy"])
    return np.percentile(values, [2.5, 97.5])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="confs.json of each trained model")
    args = p.parse_args()
    for path in args.configs:
        config = load_config(path)
        classifier = load_classifier(config, "keras")
        files = sorted((config.model.root / "validation").rglob("*.png"))  # validation/<label>/<patient>_...png
        y = np.array([int(f.parent.name) for f in files])
        patients = np.array([f.name.split("_")[0] for f in files])
        images = [decode_image(f) for f in files]
        for name, change in [("png", None), *((f"jpeg{q}", q) for q in QUALITIES)]:
            shown = images if change is None else [jpeg(i, change) for i in images]
            prob = np.concatenate([classifier.probabilities(shown[i:i + 64]) for i in range(0, len(shown), 64)])
            ba = metrics.classification_metrics(y, prob, classifier.threshold)["balanced_accuracy"]
            low, high = interval(y, prob, patients, classifier.threshold, np.random.default_rng(0))
            print(f"{path} {name}: balanced accuracy {ba:.4f} [{low:.3f}, {high:.3f}], ROC AUC "
                  f"{roc_auc_score(y, prob):.4f}, mean P(IDC) {prob.mean():.4f} ({len(files)} validation patches)",
                  flush=True)


if __name__ == "__main__":
    main()
