"""Tiny synthetic IDC-like datasets and a tiny stand-in trunk, so the full pipeline runs in
seconds without the real data or Inception V3 weights (as TF Hub's make_image_classifier tests do)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# Class 1 (IDC) patches are dense and purple, class 0 pale pink: separable, yet noisy.
COLOURS = {0: (235, 190, 215), 1: (120, 60, 150)}


def patch_image(label: int, rng: np.random.Generator, size=(50, 50)) -> Image.Image:
    base = np.array(COLOURS[label], dtype=float)
    pixels = base + rng.normal(0, 25, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# Another lab's stain and scanner: a per-channel gain and offset.
OTHER_LAB = ((0.85, 0.95, 1.05), (10, -12, 4))


def restained(image: np.ndarray, cast=OTHER_LAB) -> np.ndarray:
    """The same tissue under another stain and scanner (`cast`: per-channel gain, offset)."""
    return np.clip(np.asarray(image) * np.array(cast[0]) + np.array(cast[1]), 0, 255).astype(np.uint8)


def make_dataset(root: Path, patients: int = 10, per_class: int = 8, seed: int = 0,
                 flat: bool = False) -> Path:
    """Write a Kaggle-layout dataset: <pid>/<class>/<pid>_idx5_x<X>_y<Y>_class<C>.png."""
    rng = np.random.default_rng(seed)
    for i in range(patients):
        pid = str(9000 + i)
        for label in (0, 1):
            for k in range(per_class):
                x, y = 50 * k, 50 * label
                folder = root if flat else root / pid / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                size = (50, 32) if k == 0 else (50, 50)  # an edge patch, smaller than 50x50
                patch_image(label, rng, size).save(folder / f"{pid}_idx5_x{x}_y{y}_class{label}.png")
    return root


def write_config(tmp: Path, **classifier) -> Path:
    """A copy of the project's confs.json with ClassifierSettings overridden, in tmp."""
    raw = json.loads((ROOT / "confs.json").read_text())
    raw["ClassifierSettings"].update({"model_dir": str(tmp / "model"), "image_size": 75,
                                      "batch_size": 16, "epochs": 40, "early_stopping_patience": 40,
                                      "learning_rate": 0.01, "head_batch_size": 16,
                                      # the article's fixed 0.54, which the tests of the rule rely on
                                      "decision_rule_from_validation": False, "patch_cnn_epochs": 0, **classifier})
    path = tmp / "confs.json"
    path.write_text(json.dumps(raw, indent=2))
    return path


def tiny_trunk(image_size: int = 75):
    """A small convolutional stand-in for Inception V3 with 'mixed' blocks, pooled to 8 features."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="mixed0")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="mixed1")(x)
    inner = keras.Model(inputs, x, name="tiny_inception")
    outer_in = keras.Input((image_size, image_size, 3), name="image")
    features = keras.layers.GlobalAveragePooling2D(name="pool")(inner(outer_in))
    trunk = keras.Model(outer_in, features, name="tiny_trunk")
    trunk.trainable = False
    return trunk
