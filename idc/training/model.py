"""Inception V3 transfer learning: a pretrained trunk (frozen), pooled at configurable layers,
and a new 2-class softmax head (the article's "retrain the final layer").

The layers that feed the head are configurable because the lower blocks (mixed0..mixed2)
transfer better to 50x50 histology patches than the ImageNet-specific top (mixed10); pooling
their mean AND standard deviation keeps the texture statistics that tell tissue apart.

Beside it, a small patch CNN trained from scratch (build_patch_cnn); the exported model mixes the
two answers, the CNN's share `patch_cnn_weight`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from idc.core.cli import quiet_import

quiet_import("tensorflow")  # before Keras imports it: keeps TensorFlow's start-up noise out

import keras  # noqa: E402
import numpy as np  # noqa: E402

from idc.core.config import ClassifierSettings
from idc.core.errors import WeightsError
from idc.keras_model import (GlobalBatchDropout, GlobalBatchNormalization, MeanOverViews, MeanStdPooling,
                             ReinhardNormalization, StackedViews)
from idc.core.preprocessing import load_batch

log = logging.getLogger(__name__)

TOP_LAYER = "mixed10"
PATCH_SIZE = 50  # the dataset's patches, in pixels
WEIGHTS_HELP = (
    "Alternatives that need no internet: set ClassifierSettings.weights (or --weights) to a local "
    "Inception V3 weights file (keras.applications InceptionV3 include_top=False, e.g. "
    "inception_v3_notop.weights.h5), to a local SavedModel directory, or pre-fill the Keras cache "
    "(~/.keras/models/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5) on a machine that is online."
)


def describe_weights(weights: str) -> str:
    """A stable identity for the trunk's weights, used to key the bottleneck cache: a file's content
    hash (not its path or time stamp, which a copy or a fresh checkout changes: the cache would be
    recomputed for nothing)."""
    path = Path(weights).expanduser()
    if path.is_file():
        digest = hashlib.sha1()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return f"file:{path.name}:sha1:{digest.hexdigest()}"
    return f"source:{weights}"


def _is_hub_handle(weights: str) -> bool:
    return weights.startswith(("http://", "https://", "hub:")) or Path(weights).expanduser().is_dir()


def _pool(x, pooling: str, name: str):
    if pooling == "mean+std":
        return MeanStdPooling(name=name)(x)
    return keras.layers.GlobalAveragePooling2D(name=name)(x)


def build_trunk(weights: str, image_size: int, feature_layers: list[str], pooling: str = "mean"):
    """The frozen feature extractor: image batch in [-1, 1] -> pooled features (N, C).

    `weights`: "imagenet" (keras.applications download, cached once), a local weights file,
    or a TF Hub handle / local SavedModel directory (whose own output is used as features).
    `feature_layers`: Inception V3 layers whose pooled outputs are concatenated.
    """
    inputs = keras.Input((image_size, image_size, 3), name="image")
    if _is_hub_handle(weights):
        features = _hub_layer(weights)(inputs)
        if isinstance(features, dict):  # SavedModel signatures return a dict of outputs
            features = next(iter(features.values()))
        if len(features.shape) == 4:
            features = _pool(features, pooling, "pool")
    else:
        base = _inception_v3(weights, image_size)
        names = [layer.name for layer in base.layers]
        unknown = [name for name in feature_layers if name not in names]
        if unknown:
            mixed = [n for n in names if n.startswith("mixed") and "_" not in n]
            raise WeightsError(f"feature_layers {unknown} are not Inception V3 layers; "
                               f"choose from {', '.join(mixed)}")
        # Only the blocks up to the highest chosen layer are kept (and computed).
        cut = keras.Model(base.input, [base.get_layer(n).output for n in feature_layers],
                          name=f"inception_v3_to_{feature_layers[-1]}")
        outputs = cut(inputs)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        pooled = [_pool(x, pooling, f"pool_{n}") for x, n in zip(outputs, feature_layers)]
        features = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name="features")(pooled)
    trunk = keras.Model(inputs, features, name="trunk")
    trunk.trainable = False
    return trunk


def _inception_v3(weights: str, image_size: int):
    shape = (image_size, image_size, 3)
    if weights == "imagenet":
        try:
            return keras.applications.InceptionV3(include_top=False, weights="imagenet", input_shape=shape)
        except Exception as err:  # urllib / socket errors differ by platform and proxy
            raise WeightsError(
                f"could not download the ImageNet Inception V3 weights ({type(err).__name__}: {err}); "
                f"is this machine offline? {WEIGHTS_HELP}") from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist. {WEIGHTS_HELP}")
    try:
        return keras.applications.InceptionV3(include_top=False, weights=str(path), input_shape=shape)
    except Exception as err:
        raise WeightsError(f"could not load Inception V3 weights from {path}: {err}") from None


def _hub_layer(handle: str):
    """A Keras 3 layer around a TF Hub handle or a local SavedModel (serving_default)."""
    path = Path(handle).expanduser()
    if not path.is_dir():
        try:
            import tensorflow_hub as hub

            path = Path(hub.resolve(handle.removeprefix("hub:")))
        except Exception as err:
            raise WeightsError(f"could not fetch the TF Hub model {handle} ({type(err).__name__}: {err}); "
                               f"is this machine offline? {WEIGHTS_HELP}") from None
    try:
        return keras.layers.TFSMLayer(str(path), call_endpoint="serving_default", name="hub_trunk")
    except Exception as err:
        raise WeightsError(f"{path} is not a SavedModel with a serving_default signature: {err}") from None


@keras.saving.register_keras_serializable(package="idc")
class ShiftPenalty(keras.regularizers.Regularizer):
    """L2 weight decay plus `strength` x the mean square of the change in the IDC logit margin that given
    feature shifts cause (`second_moment`: E[d d^T] of the standardised shifts d), for the 2-way softmax's
    kernel: a stability penalty (Zheng et al. 2016) that a linear layer can take in closed form."""

    def __init__(self, l2: float, strength: float, second_moment):
        self.l2, self.strength = float(l2), float(strength)
        self.second_moment = np.asarray(second_moment, dtype=np.float32)

    def __call__(self, kernel):
        margin = kernel[:, 1] - kernel[:, 0]  # the IDC logit margin's weights
        shift = keras.ops.sum(margin * keras.ops.matmul(keras.ops.convert_to_tensor(self.second_moment), margin))
        return self.l2 * keras.ops.sum(keras.ops.square(kernel)) + self.strength * shift

    def get_config(self):  # for the copies a cluster's strategy makes; the exported head has plain L2
        return {"l2": self.l2, "strength": self.strength, "second_moment": self.second_moment.tolist()}


def build_head(feature_dim: int, train_features=None, l2: float = 0.0, shifts: np.ndarray | None = None,
               invariance: float = 0.0, hidden: int = 0, seed: int = 0):
    """The new final layers: standardised features -> (with `hidden` > 0, a ReLU layer of that many units
    and dropout ->) 2-way softmax, with L2 weight decay.

    The standardisation is adapted on the training features and saved with the model, so the
    exported model needs no separate scaler. (For the softmax layer alone, L2 generalised better to
    held-out patients than dropout did; the hidden layer, chosen on patient folds, takes both.) With `shifts` (N, feature_dim: how the features of a patch
    move when it is JPEG-compressed or blurred) and `invariance` > 0, training also penalises how far those shifts
    move the answer (ShiftPenalty: a linear head only); export the trained layer without it (`build_head` +
    copy_weights)."""
    inputs = keras.Input((feature_dim,), name="features")
    normalize = keras.layers.Normalization(name="standardize")
    if train_features is not None:
        normalize.adapt(train_features)
    regularizer = keras.regularizers.L2(l2) if l2 else None
    x = normalize(inputs)
    if hidden:
        x = keras.layers.Dense(hidden, activation="relu", kernel_regularizer=regularizer, name="hidden")(x)
        # Dropout over the global batch, as in the patch CNN: a cluster trains the head one machine trains.
        x = GlobalBatchDropout(0.3, seed=seed, name="hidden_dropout")(x)
    elif shifts is not None and invariance > 0:
        standardised = shifts / np.sqrt(np.maximum(keras.ops.convert_to_numpy(normalize.variance), 1e-12)).reshape(1, -1)
        regularizer = ShiftPenalty(l2, invariance, standardised.T @ standardised / len(standardised))
    outputs = keras.layers.Dense(2, activation="softmax", kernel_regularizer=regularizer, name="idc_softmax")(x)
    return keras.Model(inputs, outputs, name="head")


def build_patch_cnn(image_size: int, l2: float = 1e-4, seed: int = 0):
    """A small CNN trained from scratch on the patch at its native scale: image in [-1, 1] ->
    [P(no IDC), P(IDC)].

    The input is the model's (image_size px, the 50 px patch enlarged for Inception); averaging it back
    over blocks of image_size // 50 pixels gives the patch's own scale, where three conv blocks see the
    whole patch. Its errors differ from those of the frozen ImageNet features, so the two together are
    better than either (docs/results.md, "What each element adds"). Its BatchNorm and dropout take the
    global batch, so any number of workers trains the model one machine trains."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = inputs
    factor = max(1, image_size // PATCH_SIZE)
    if factor > 1:
        x = keras.layers.AveragePooling2D(factor, name="native_scale")(x)
    for block, filters in enumerate((32, 64, 128), start=1):
        for conv in (1, 2):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{block}_conv{conv}")(x)
            x = GlobalBatchNormalization(name=f"block{block}_bn{conv}")(x)
            x = keras.layers.ReLU(name=f"block{block}_relu{conv}")(x)
        x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = GlobalBatchDropout(0.3, seed=seed, name="dropout")(x)
    outputs = keras.layers.Dense(2, activation="softmax", kernel_regularizer=keras.regularizers.L2(l2),
                                 name="patch_softmax")(x)
    return keras.Model(inputs, outputs, name="patch_cnn")


def fit_stain_normalizer(method: str, paths: list, image_size: int, batch: int = 512) -> ReinhardNormalization | None:
    """The model's stain normalisation layer for `method` "reinhard", fitted on the training images at
    `paths` (read in batches, at the model's input size); None for "none" and "slide" (done outside
    the model, per slide: idc.slides.stain), which read nothing."""
    if method != "reinhard":
        return None
    batches = (load_batch(paths[i:i + batch], image_size) for i in range(0, len(paths), batch))
    return ReinhardNormalization.fit(batches, name="stain_normalization")


def with_normalizer(model, normalizer):
    """`model` with the stain normaliser in front (`model` itself when there is none), for the training
    steps that feed it images: the bottleneck extraction, fine-tuning and the patch CNN."""
    if normalizer is None:
        return model
    inputs = keras.Input(model.input_shape[1:], name="image")
    return keras.Model(inputs, model(normalizer(inputs)), name=f"normalized_{model.name}")


def build_classifier(trunk, head, tta_views: tuple[str, ...] = (), patch_cnn=None, normalizer=None,
                     patch_cnn_weight: float = ClassifierSettings.patch_cnn_weight):
    """Trunk + head (and the patch CNN, if any) as one model: image in [-1, 1] -> [P(no IDC), P(IDC)].

    With `patch_cnn`, the answer is the weighted mean of the head's and the patch CNN's, the CNN's share
    `patch_cnn_weight`. With `tta_views`, it is
    the mean over those views of the image (test-time augmentation): steadier on patches whose evidence
    sits at an edge, at a cost in speed; the views go through the networks as one stacked batch
    (StackedViews), which on a CPU is faster than one branch per view. With `normalizer`
    (fit_stain_normalizer), the image is stain-normalised first, once: its statistics do not change
    with the view."""
    inputs = keras.Input(trunk.input_shape[1:], name="image")
    image = inputs if normalizer is None else normalizer(inputs)
    if len(tta_views) > 1:
        image = StackedViews(tta_views, name="tta_views")(image)
    answer = head(trunk(image))
    if patch_cnn is not None:
        answer = keras.layers.Add(name="ensemble")([
            keras.layers.Rescaling(1.0 - patch_cnn_weight, name="head_share")(answer),
            keras.layers.Rescaling(patch_cnn_weight, name="patch_cnn_share")(patch_cnn(image))])
    if len(tta_views) > 1:
        answer = MeanOverViews(len(tta_views), name="tta_mean")(answer)
    return keras.Model(inputs, answer, name="DevCloudIDC")
