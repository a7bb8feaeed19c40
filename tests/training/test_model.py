"""Where the pretrained trunk comes from: keras.applications, a weights file, a SavedModel."""

import numpy as np
import pytest

from idc.core.errors import WeightsError
from idc.training.model import WEIGHTS_HELP, build_trunk, describe_weights
from tests.synthetic import tiny_trunk


def test_missing_weights_file_names_the_alternatives(tmp_path):
    with pytest.raises(WeightsError, match="does not exist") as err:
        build_trunk(str(tmp_path / "absent.weights.h5"), 75, ["mixed0"])
    assert WEIGHTS_HELP in str(err.value)


def test_offline_imagenet_download_says_so(monkeypatch, tmp_path):
    """The real keras.applications download, pointed at a closed port (as on a machine with no
    internet), fails with a message that says what to do instead."""
    from keras.src.applications import inception_v3
    from keras.src.utils import file_utils

    monkeypatch.setattr(inception_v3, "WEIGHTS_PATH_NO_TOP", "http://127.0.0.1:9/inception_v3_notop.h5")
    real_get_file = file_utils.get_file
    # a fresh cache folder, so a previously downloaded file cannot hide the failure
    monkeypatch.setattr(inception_v3.file_utils, "get_file",
                        lambda *a, **k: real_get_file(*a, **{**k, "cache_dir": str(tmp_path)}))
    with pytest.raises(WeightsError, match="could not download the ImageNet.*offline") as err:
        build_trunk("imagenet", 75, ["mixed0"])
    assert "weights file" in str(err.value) and "SavedModel" in str(err.value)


def test_local_savedmodel_trunk(tmp_path):
    """A TF Hub-style trunk: a local SavedModel directory with a serving_default signature."""
    exported = tmp_path / "trunk_savedmodel"
    tiny = tiny_trunk(75)
    tiny.export(str(exported), verbose=False)
    trunk = build_trunk(str(exported), 75, ["ignored"], "mean")
    batch = np.random.default_rng(0).uniform(-1, 1, (2, 75, 75, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(trunk(batch)), np.asarray(tiny(batch)), atol=1e-5)
    assert describe_weights(str(exported)).startswith("source:")


def test_not_a_savedmodel_is_explained(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="not a SavedModel"):
        build_trunk(str(tmp_path / "empty"), 75, ["mixed0"])


def test_weights_identity_changes_with_the_file(tmp_path):
    weights = tmp_path / "w.h5"
    weights.write_bytes(b"1")
    first = describe_weights(str(weights))
    weights.write_bytes(b"22")
    assert describe_weights(str(weights)) != first
    # a copy elsewhere (a new path and time stamp, the same bytes) keeps the identity: no recomputation
    copy = tmp_path / "elsewhere" / "w.h5"
    copy.parent.mkdir()
    copy.write_bytes(b"22")
    assert describe_weights(str(copy)) == describe_weights(str(weights))


def test_a_head_penalised_for_what_jpeg_moves_leans_on_what_it_does_not():
    import keras

    from idc.training.model import build_head

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    features = labels[:, None] + rng.normal(0, 1, (2000, 2))  # two features, equally telling
    shifts = np.stack([np.zeros(500), rng.normal(0, 1, 500)], 1)  # compression moves the second alone

    def margin(invariance: float) -> np.ndarray:
        keras.utils.set_random_seed(0)
        head = build_head(2, features, shifts=shifts, invariance=invariance)
        head.compile(keras.optimizers.Adam(0.05), "sparse_categorical_crossentropy")
        head.fit(features, labels, epochs=20, batch_size=200, verbose=0)
        kernel = np.asarray(head.get_layer("idc_softmax").kernel)
        return np.abs(kernel[:, 1] - kernel[:, 0])

    plain, invariant = margin(0.0), margin(3.0)
    assert plain[1] > 0.7 * plain[0]
    assert invariant[1] < 0.3 * invariant[0]


def test_a_hidden_layer_lets_the_head_learn_what_a_linear_one_cannot():
    """head_hidden_units: a label that is an interaction of two features (XOR-like) is beyond a softmax
    layer and within reach of one hidden layer; at inference its dropout is off (the same answer twice)."""
    import keras

    from idc.training.model import build_head

    rng = np.random.default_rng(0)
    features = rng.normal(0, 1, (4000, 2))
    labels = (features[:, 0] * features[:, 1] > 0).astype(np.int64)

    def accuracy(hidden: int):
        keras.utils.set_random_seed(0)
        head = build_head(2, features, hidden=hidden)
        head.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
        head.fit(features, labels, epochs=30, batch_size=200, verbose=0)
        first, second = head.predict(features, verbose=0), head.predict(features, verbose=0)
        np.testing.assert_array_equal(first, second)
        return float(np.mean(first.argmax(1) == labels))

    assert accuracy(0) < 0.65
    assert accuracy(32) > 0.9
