"""The saved Keras model: its custom layers (test-time views, mean+std pooling, the patch CNN's
BatchNorm and dropout, stain normalisation) and its loader.

Defining the layers registers them with Keras, so that `keras.models.load_model` can rebuild a
trained model. Shared by training and the edge's Keras fallback; it imports TensorFlow, so it lives
outside the light `idc.core`, and the edge box imports it only for that fallback, never to serve an IR.
"""

from __future__ import annotations

from pathlib import Path

from idc.core.cli import quiet_import

quiet_import("tensorflow")  # before Keras imports it: keeps TensorFlow's start-up noise out

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from idc.core.errors import ModelNotFoundError  # noqa: E402
from idc.slides import stain as slide_stain  # noqa: E402

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
        return dihedral(x, self.view)

    def get_config(self):
        return {**super().get_config(), "view": self.view}


def dihedral(x, view: str):
    """One view of an image batch, as a Keras op (view_array's twin)."""
    if view == "hflip":
        return ops.flip(x, axis=2)
    if view == "vflip":
        return ops.flip(x, axis=1)
    if view == "rot90":
        return ops.flip(ops.transpose(x, (0, 2, 1, 3)), axis=1)
    return x


@keras.saving.register_keras_serializable(package="idc")
class StackedViews(keras.layers.Layer):
    """The views of an image batch (N, H, W, C) stacked into one batch (V*N, H, W, C), view after
    view: the trunk then runs once on a batch of V*N instead of V times on N, which is the same
    arithmetic but faster on a CPU (its kernels use the cores better on a larger batch)."""

    def __init__(self, views, **kwargs):
        super().__init__(**kwargs)
        for view in views:
            view_array(np.zeros((1, 1, 1, 1)), view)  # validates the names
        self.views = list(views)

    def call(self, x):
        return ops.concatenate([dihedral(x, view) for view in self.views], axis=0)

    def get_config(self):
        return {**super().get_config(), "views": self.views}


@keras.saving.register_keras_serializable(package="idc")
class MeanOverViews(keras.layers.Layer):
    """The mean of StackedViews' answers (V*N, K) over its V views: (N, K)."""

    def __init__(self, count: int, **kwargs):
        super().__init__(**kwargs)
        self.count = int(count)

    def call(self, x):
        return ops.mean(ops.reshape(x, (self.count, -1, x.shape[-1])), axis=0)

    def get_config(self):
        return {**super().get_config(), "count": self.count}


@keras.saving.register_keras_serializable(package="idc")
class MeanStdPooling(keras.layers.Layer):
    """Per-channel spatial mean and standard deviation: first- and second-order texture."""

    def call(self, x):
        mean = ops.mean(x, axis=(1, 2), keepdims=True)
        # Two passes (mean of squared deviations), not E[x^2] - E[x]^2: stable in reduced precision.
        std = ops.sqrt(ops.mean(ops.square(x - mean), axis=(1, 2)) + 1e-6)
        return ops.concatenate([ops.squeeze(mean, axis=(1, 2)), std], axis=-1)


@keras.saving.register_keras_serializable(package="idc")
class GlobalBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization over the global batch: the sums behind each channel's mean and variance are
    taken over every replica's rows (an all-reduce, as Keras's synchronized BatchNorm does) in
    float64, so they do not depend on how many replicas share the batch, nor in what order their
    float32 sums add up; one worker and N workers train the same model (to float32 rounding)."""

    def __init__(self, **kwargs):
        kwargs.pop("synchronized", None)
        super().__init__(synchronized=True, **kwargs)

    def _moments(self, inputs, mask):
        if mask is not None:
            return super()._moments(inputs, mask)
        import tensorflow as tf  # the all-reduce over the strategy's replicas (a TensorFlow training loop)

        x = tf.cast(inputs, tf.float64)
        axes = self._reduction_axes
        sums = tf.stack([tf.reduce_sum(x, axes), tf.reduce_sum(tf.square(x), axes)])
        count = tf.cast(tf.size(x) // tf.shape(x)[self.axis], tf.float64)
        context = tf.distribute.get_replica_context()
        if context is not None:
            sums, count = context.all_reduce("sum", sums), context.all_reduce("sum", count)
        mean = sums[0] / count
        variance = tf.maximum(sums[1] / count - tf.square(mean), 0.0)
        return tf.cast(mean, inputs.dtype), tf.cast(variance, inputs.dtype)


@keras.saving.register_keras_serializable(package="idc")
class GlobalBatchDropout(keras.layers.Layer):
    """Dropout whose mask is drawn for the whole global batch, the same on every replica of a
    tf.distribute strategy, each replica taking the rows it holds (replica r: rows r * n to (r + 1) * n,
    as idc.training.distributed splits a batch). One worker and N workers so drop the same units of
    the same examples, and train the same model; Keras's Dropout draws each replica's mask on its own.
    Each mask comes from (seed, masks drawn so far), and that count is a weight: a copy of the layer and
    a job resumed from its backup draw the masks the uninterrupted run would."""

    def __init__(self, rate: float, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.seed = float(rate), int(seed)

    def build(self, input_shape):
        self.draws = self.add_weight(name="draws", shape=(), dtype="int64", initializer="zeros", trainable=False,
                                     aggregation="only_first_replica")

    def call(self, x, training=False):
        if not training or self.rate == 0:
            return x
        import tensorflow as tf  # the replica's place in the global batch (a TensorFlow training loop)

        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context is not None else 1
        replica = context.replica_id_in_sync_group if context is not None else 0
        rows = tf.shape(x)[0]
        seed = tf.cast(tf.stack([tf.constant(self.seed, tf.int64), tf.convert_to_tensor(self.draws)]) % (2 ** 31 - 1),
                       tf.int32)
        keep = tf.random.stateless_uniform(tf.concat([[rows * replicas], tf.shape(x)[1:]], 0), seed) >= self.rate
        self.draws.assign_add(1)
        mine = keep[replica * rows:(replica + 1) * rows]
        return tf.where(mine, x / (1.0 - self.rate), tf.zeros_like(x))

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


# Reinhard et al. (2001), "Color transfer between images": RGB -> LMS cone space -> log10 -> lαβ, where
# the three channels are nearly decorrelated, so each can be standardised on its own.
# (idc.slides.stain holds the matrices, and does the same per slide in NumPy.)
_LN10 = float(np.log(10.0))


@keras.saving.register_keras_serializable(package="idc")
class ReinhardNormalization(keras.layers.Layer):
    """Reinhard stain normalisation inside the model: each image's lαβ channels are shifted and scaled
    to the training patches' mean and standard deviation (`target_mean`, `target_std`, fitted by
    `fit`). Image in [-1, 1] -> normalised image in [-1, 1].

    Being a layer, it is part of the saved model and so of every IR: training, evaluation, the
    server and the review station apply exactly the same preprocessing. Its statistics are per image,
    so a flip or rotation of the image gives the same flip or rotation of the result."""

    def __init__(self, target_mean, target_std, **kwargs):
        super().__init__(**kwargs)
        self.target_mean = [float(v) for v in target_mean]
        self.target_std = [float(v) for v in target_std]

    @staticmethod
    def to_lab(x):
        rgb = ops.clip((ops.convert_to_tensor(x, "float32") + 1.0) / 2.0, 1.0 / 255.0, 1.0)
        log_lms = ops.log(ops.matmul(rgb, ops.convert_to_tensor(slide_stain.RGB_TO_LMS.T, "float32"))) / _LN10
        return ops.matmul(log_lms, ops.convert_to_tensor(slide_stain.LOG_LMS_TO_LAB.T, "float32"))

    @staticmethod
    def from_lab(lab):
        log_lms = ops.matmul(lab, ops.convert_to_tensor(slide_stain.LAB_TO_LOG_LMS.T, "float32"))
        rgb = ops.matmul(ops.exp(log_lms * _LN10), ops.convert_to_tensor(slide_stain.LMS_TO_RGB.T, "float32"))
        return ops.clip(rgb, 0.0, 1.0) * 2.0 - 1.0

    @classmethod
    def image_stats(cls, x):
        """Each image's lαβ mean and standard deviation: two (N, 3) tensors."""
        lab = cls.to_lab(x)
        return ops.mean(lab, axis=(1, 2)), ops.std(lab, axis=(1, 2))

    @classmethod
    def fit(cls, batches, **kwargs) -> ReinhardNormalization:
        """The layer whose target is the mean, over the images of `batches` (image batches in [-1, 1]), of
        each image's lαβ mean and standard deviation: the training patches' typical stain."""
        means, stds = zip(*(map(np.asarray, cls.image_stats(batch)) for batch in batches))
        return cls(np.concatenate(means).mean(0), np.concatenate(stds).mean(0), **kwargs)

    def call(self, x):
        lab = self.to_lab(x)
        mean = ops.mean(lab, axis=(1, 2), keepdims=True)
        std = ops.std(lab, axis=(1, 2), keepdims=True)
        target_mean = ops.convert_to_tensor(self.target_mean, "float32")
        target_std = ops.convert_to_tensor(self.target_std, "float32")
        return self.from_lab((lab - mean) / (std + 1e-4) * target_std + target_mean)

    def describe(self) -> str:
        return ("reinhard mean " + ",".join(f"{v:.4f}" for v in self.target_mean)
                + " std " + ",".join(f"{v:.4f}" for v in self.target_std))

    def get_config(self):
        return {**super().get_config(), "target_mean": self.target_mean, "target_std": self.target_std}


def load_keras_model(path: Path, external_trunk: bool = False):
    """The trained Keras model at `path` (inference only: not compiled).

    `external_trunk`: the model wraps a TF Hub / SavedModel trunk (a TFSMLayer), which Keras loads
    only with safe_mode off; the bundle says so (Bundle.external_trunk) for models trainer.py made."""
    if not Path(path).exists():
        raise ModelNotFoundError(f"no trained model at {path}: run `python trainer.py train` first")
    return keras.models.load_model(path, compile=False, safe_mode=not external_trunk)
