"""The saved Keras model: its custom layers (test-time views, mean+std pooling) and its loader.

Defining the layers registers them with Keras, so that `keras.models.load_model` can rebuild a
trained model. Imports TensorFlow/Keras: the edge box imports this only for the Keras fallback,
never to serve an IR.
"""

from __future__ import annotations

from pathlib import Path

from idc.core.cli import quiet_import

quiet_import("tensorflow")  # before Keras imports it: keeps TensorFlow's start-up noise out

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from idc.core.errors import ModelNotFoundError  # noqa: E402

# Histology has no orientation: these views of a patch are equally valid. Training uses them as
# augmentation (cached bottlenecks of each view); inference may average over them (TTA).
VIEWS = ("identity", "hflip", "vflip", "rot90")


def view_array(batch: np.ndarray, view: str) -> np.ndarray:
    """One view of an image batch (N, H, W, C), in NumPy; the same as DihedralView."""
    if view == "identity":
        return batch
    if view == "hflip":
        return batch[:, :, ::-1]
    if view == "vflip":
        return batch[:, ::-1]
    if view == "rot90":
        return np.rot90(batch, 1, axes=(1, 2))
    raise ValueError(f"unknown view {view!r}; use one of {VIEWS}")


@keras.saving.register_keras_serializable(package="idc")
class DihedralView(keras.layers.Layer):
    """A flip or 90-degree rotation of an image batch, inside the model (for TTA)."""

    def __init__(self, view: str, **kwargs):
        super().__init__(**kwargs)
        view_array(np.zeros((1, 1, 1, 1)), view)  # validates the name
        self.view = view

    def call(self, x):
        if self.view == "hflip":
            return ops.flip(x, axis=2)
        if self.view == "vflip":
            return ops.flip(x, axis=1)
        if self.view == "rot90":
            return ops.flip(ops.transpose(x, (0, 2, 1, 3)), axis=1)
        return x

    def get_config(self):
        return {**super().get_config(), "view": self.view}


@keras.saving.register_keras_serializable(package="idc")
class MeanStdPooling(keras.layers.Layer):
    """Per-channel spatial mean and standard deviation: first- and second-order texture."""

    def call(self, x):
        mean = ops.mean(x, axis=(1, 2), keepdims=True)
        # Two passes (mean of squared deviations), not E[x^2] - E[x]^2: stable in reduced precision.
        std = ops.sqrt(ops.mean(ops.square(x - mean), axis=(1, 2)) + 1e-6)
        return ops.concatenate([ops.squeeze(mean, axis=(1, 2)), std], axis=-1)


def load_keras_model(path: Path, external_trunk: bool = False):
    """The trained Keras model at `path` (inference only: not compiled).

    `external_trunk`: the model wraps a TF Hub / SavedModel trunk (a TFSMLayer), which Keras loads
    only with safe_mode off; the bundle says so (Bundle.external_trunk) for models trainer.py made."""
    if not Path(path).exists():
        raise ModelNotFoundError(f"no trained model at {path}: run `python trainer.py train` first")
    return keras.models.load_model(path, compile=False, safe_mode=not external_trunk)
