"""Inception V3 transfer learning: a pretrained trunk (frozen), global average pooling at a
configurable layer, and a new 2-class softmax head (the article's "retrain the final layer").

The layer that feeds the head is configurable because the middle blocks (mixed2..mixed5)
transfer better to 50x50 histology patches than the ImageNet-specific top (mixed10).
"""

from __future__ import annotations

import logging
from pathlib import Path

from idc.errors import WeightsError

log = logging.getLogger(__name__)

TOP_LAYER = "mixed10"
WEIGHTS_HELP = (
    "Alternatives that need no internet: set ClassifierSettings.weights (or --weights) to a local "
    "Inception V3 weights file (keras.applications InceptionV3 include_top=False, e.g. "
    "inception_v3_notop.weights.h5), to a local SavedModel directory, or pre-fill the Keras cache "
    "(~/.keras/models/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5) on a machine that is online."
)


def describe_weights(weights: str) -> str:
    """A stable identity for the trunk's weights, used to key the bottleneck cache."""
    path = Path(weights).expanduser()
    if path.is_file():
        stat = path.stat()
        return f"file:{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    return f"source:{weights}"


def _is_hub_handle(weights: str) -> bool:
    return weights.startswith(("http://", "https://", "hub:")) or Path(weights).expanduser().is_dir()


def build_trunk(weights: str, image_size: int, feature_layer: str):
    """The frozen feature extractor: image batch in [-1, 1] -> pooled features (N, C).

    `weights`: "imagenet" (keras.applications download, cached once), a local weights file,
    or a TF Hub handle / local SavedModel directory (whose own output is used as features).
    """
    import keras

    inputs = keras.Input((image_size, image_size, 3), name="image")
    if _is_hub_handle(weights):
        features = _hub_layer(weights)(inputs)
        if isinstance(features, dict):  # SavedModel signatures return a dict of outputs
            features = next(iter(features.values()))
        if len(features.shape) == 4:
            features = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    else:
        base = _inception_v3(weights, image_size)
        try:
            layer_output = base.get_layer(feature_layer).output
        except ValueError:
            names = [l.name for l in base.layers if l.name.startswith("mixed")]
            raise WeightsError(f"feature_layer {feature_layer!r} is not an Inception V3 layer; "
                               f"choose one of {', '.join(names)}") from None
        cut = keras.Model(base.input, layer_output, name=f"inception_v3_to_{feature_layer}")
        features = keras.layers.GlobalAveragePooling2D(name="pool")(cut(inputs))
    trunk = keras.Model(inputs, features, name="trunk")
    trunk.trainable = False
    return trunk


def _inception_v3(weights: str, image_size: int):
    import keras

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
    import keras

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


def build_head(feature_dim: int, train_features=None, dropout: float = 0.3):
    """The new final layer: standardised features -> dropout -> 2-way softmax.

    The standardisation is adapted on the training features and saved with the model, so the
    exported model needs no separate scaler."""
    import keras

    inputs = keras.Input((feature_dim,), name="features")
    normalize = keras.layers.Normalization(name="standardize")
    if train_features is not None:
        normalize.adapt(train_features)
    x = keras.layers.Dropout(dropout)(normalize(inputs))
    outputs = keras.layers.Dense(2, activation="softmax", name="idc_softmax")(x)
    return keras.Model(inputs, outputs, name="head")


def build_classifier(trunk, head):
    """Trunk + head as one model: image in [-1, 1] -> [P(no IDC), P(IDC)]."""
    import keras

    inputs = keras.Input(trunk.input_shape[1:], name="image")
    return keras.Model(inputs, head(trunk(inputs)), name="DevCloudIDC")
