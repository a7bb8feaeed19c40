"""Stain augmentation: reproducible, keeps geometry and labels, and trains like any other view."""

import csv
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from idc.core.config import load_config
from idc.core.errors import ConfigError
from idc.training import augment
from idc.training.evaluation import evaluate
from idc.training.train import train
from tests.synthetic import make_dataset, patch_image, restained, tiny_trunk, write_config

STRENGTH = {"hed": 0.05, "brightness": 0.1, "contrast": 0.1, "saturation": 0.1}


def stained_image(rng) -> np.ndarray:
    """An image made of haematoxylin and eosin only (no DAB), as H&E slides are."""
    from skimage.color import hed2rgb

    stains = np.stack([rng.uniform(0, 0.08, (50, 50)), rng.uniform(0, 0.05, (50, 50)), np.zeros((50, 50))], -1)
    return np.clip(np.rint(hed2rgb(stains) * 255), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def patches():
    rng = np.random.default_rng(0)
    return [np.asarray(patch_image(label, rng)) for label in (0, 1, 0, 1)] + [np.asarray(patch_image(1, rng, (50, 32)))]


def test_a_stain_view_is_the_same_image_every_time(patches):
    digests = [f"{i:040x}" for i in range(len(patches))]
    first = augment.view_batch(patches, digests, "stain1", 75, STRENGTH, seed=42)
    again = augment.view_batch(patches, digests, "stain1", 75, STRENGTH, seed=42)
    assert np.array_equal(first, again)
    # another view, another seed or another image: other draws
    for other in (augment.view_batch(patches, digests, "stain2", 75, STRENGTH, seed=42),
                  augment.view_batch(patches, digests, "stain1", 75, STRENGTH, seed=7),
                  augment.view_batch(patches, digests[::-1], "stain1", 75, STRENGTH, seed=42)):
        assert not np.array_equal(first, other)


def test_stain_jitter_keeps_geometry_and_stays_within_its_strength(patches):
    rng = np.random.default_rng(1)
    for image in patches:
        out = augment.stain_jitter(image, rng, STRENGTH)
        assert out.shape == image.shape and out.dtype == np.uint8
    # no jitter: the colour deconvolution round trip gives an H&E image back (to rounding)
    zero = dict.fromkeys(STRENGTH, 0.0)
    image = stained_image(np.random.default_rng(2))
    assert np.mean(np.abs(augment.stain_jitter(image, rng, zero).astype(int) - image)) < 1.0
    # brightness alone: the mean intensity moves by at most its strength
    for _ in range(20):
        out = augment.stain_jitter(image, rng, {**zero, "brightness": 0.1}).astype(float)
        assert 0.88 <= out.mean() / image.mean() <= 1.12
    # stronger HED jitter moves colours further (on average over draws)
    change = {s: np.mean([np.abs(augment.stain_jitter(image, np.random.default_rng(i), {**zero, "hed": s})
                                 .astype(int) - image).mean() for i in range(10)]) for s in (0.02, 0.2)}
    assert change[0.2] > 2 * change[0.02]


def test_view_batch_gives_the_models_input(patches):
    digests = [str(i) for i in range(len(patches))]
    batch = augment.view_batch(patches, digests, "stain3", 80, STRENGTH)
    assert batch.shape == (len(patches), 80, 80, 3) and batch.dtype == np.float32
    assert -1.0 <= batch.min() and batch.max() <= 1.0
    assert np.array_equal(augment.view_batch(patches, digests, "hflip", 80),
                          augment.view_batch(patches, digests, "identity", 80)[:, :, ::-1])
    with pytest.raises(ValueError, match="stain jitter strengths"):
        augment.view_batch(patches, digests, "stain1", 80)


def test_the_cache_key_follows_the_strength():
    assert augment.describe_view("hflip", STRENGTH, 1) == "hflip"
    assert augment.describe_view("stain1", STRENGTH, 1) != augment.describe_view("stain1", {**STRENGTH, "hed": 0.2}, 1)
    assert augment.describe_view("stain1", STRENGTH, 1) != augment.describe_view("stain1", STRENGTH, 2)


def test_config_checks_views_and_strengths(tmp_path):
    with pytest.raises(ConfigError, match="train_views"):
        load_config(write_config(tmp_path, train_views=["identity", "stainX"]))
    with pytest.raises(ConfigError, match="stain_jitter"):
        load_config(write_config(tmp_path, stain_jitter={"hed": 0.05}))
    with pytest.raises(ConfigError, match="'stain_normalization'.*\"none\", \"reinhard\" or \"slide\""):
        load_config(write_config(tmp_path, stain_normalization="macenko"))
    config = load_config(write_config(tmp_path, train_views=["identity", "rot90", "stain1", "stain2"]))
    assert config.classifier.tta_views == ("identity", "rot90")


def test_training_with_stain_views_keeps_the_labels(tmp_path):
    data = make_dataset(tmp_path / "data", patients=6, per_class=6)
    config = load_config(write_config(tmp_path, dataset_dir=str(data), train_views=["identity", "stain1", "stain2"]))
    from trainer import sort

    sort(config)
    record = train(config, trunk=tiny_trunk(75))
    train_patches = sum(record["data"]["train"]["patches"].values())
    assert record["bottleneck_cache"]["train"]["computed"] == 3 * train_patches
    model = json.loads((config.model_dir / "model.json").read_text())
    assert model["train_views"] == ["identity", "stain1", "stain2"]
    # re-stained copies keep their patch's label: the head still separates the classes
    assert record["head_history"]["accuracy"][-1] >= 0.9
    assert evaluate(config, split="test", echo=lambda *a: None)["balanced_accuracy"] >= 0.9


def patch_files(tmp_path) -> list:
    """Four patches of one patient as PNG files, labels alternating."""
    from idc.core.bundle import Patch

    rng = np.random.default_rng(0)
    patches = []
    for i in range(4):
        path = tmp_path / f"9_idx5_x{50 * i}_y0_class{i % 2}.png"
        patch_image(i % 2, rng).save(path)
        patches.append(Patch(path=path, patient="9", x=50 * i, y=0, label=i % 2))
    return patches


def test_fine_tuning_reads_each_patch_seeded_by_epoch_and_restained(tmp_path):
    from idc.training.train import image_reader

    patches = patch_files(tmp_path)
    plain = image_reader(patches, 75, seed=1, augmented=False)
    flipped = image_reader(patches, 75, seed=1, augmented=True)
    stained = image_reader(patches, 75, seed=1, augmented=True, stain_jitter=STRENGTH)
    rows = np.array([2, 0])
    assert plain(rows, 0).shape == flipped(rows, 0).shape == stained(rows, 0).shape == (2, 75, 75, 3)
    assert np.array_equal(flipped(rows, 3), flipped(rows, 3))  # a resumed epoch reads the same batch
    assert np.array_equal(stained(rows, 3), stained(rows, 3))
    assert not np.array_equal(stained(rows, 3), stained(rows, 4))
    # flips and rotations move pixels but keep the colours; re-staining changes them
    assert np.allclose(np.sort(flipped(rows, 3).reshape(2, -1)), np.sort(plain(rows, 3).reshape(2, -1)), atol=0.01)
    assert not np.allclose(np.sort(stained(rows, 3).reshape(2, -1)), np.sort(plain(rows, 3).reshape(2, -1)))


def test_a_shifted_patch_is_the_same_tissue_moved_with_its_edge_reflected():
    image = np.random.default_rng(0).integers(0, 256, (50, 32, 3), dtype=np.uint8)  # an edge patch: not square
    moves = set()
    for seed in range(40):
        moved = augment.shifted(image, np.random.default_rng(seed), 4)
        assert moved.shape == image.shape
        # find the move: the moved image's middle is the original's, offset by (dy, dx)
        dy, dx = next((dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                      if np.array_equal(moved[4:-4, 4:-4], image[4 + dy:46 + dy, 4 + dx:28 + dx]))
        moves.add((dy, dx))
        if dy > 0:  # the rows that came in at the bottom mirror the last rows
            assert np.array_equal(moved[-1, 4:-4], image[49 - dy, 4 + dx:28 + dx])
    assert len(moves) > 15  # up to 4 px either way along each axis, drawn anew each time
    assert {dy for dy, _ in moves} == set(range(-4, 5))


def test_the_patch_cnn_reads_shifted_patches_with_random_shift(tmp_path):
    from idc.training.train import image_examples

    patches = patch_files(tmp_path)
    config = load_config(write_config(tmp_path, image_size=75, train_views=["identity"]))
    rows = np.arange(4)
    unshifted, unmoved_validation = image_examples(config.classifier, patches, patches, None)
    shifted_settings = dataclasses.replace(config.classifier, random_shift=6)
    moved, validation = image_examples(shifted_settings, patches, patches, None)
    assert moved.read(rows, 2).shape == unshifted.read(rows, 2).shape == (4, 75, 75, 3)
    assert np.array_equal(moved.read(rows, 2), moved.read(rows, 2))  # seeded by epoch and patch
    assert not np.array_equal(moved.read(rows, 2), unshifted.read(rows, 2))
    assert np.array_equal(validation.read(rows, 2), unmoved_validation.read(rows, 2))  # held-out patches never move


def test_fine_tuning_trains_the_blocks_that_feed_the_head_but_never_the_stem():
    import keras

    from idc.training.train import unfreeze_blocks

    base = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(75, 75, 3))
    cut = keras.Model(base.input, [base.get_layer("mixed0").output, base.get_layer("mixed1").output])
    inputs = keras.Input((75, 75, 3))
    trunk = keras.Model(inputs, [keras.layers.GlobalAveragePooling2D()(x) for x in cut(inputs)])
    names = [layer.name for layer in cut.layers]
    trainable = lambda: {l.name for l in cut.layers if l.trainable and l.weights}  # noqa: E731
    unfreeze_blocks(trunk, 1)  # mixed1's block only
    assert trainable() and all(names.index(n) > names.index("mixed0") for n in trainable())
    unfreeze_blocks(trunk, 2)  # both blocks, from the stem's last pooling on
    stem_end = max(i for i, l in enumerate(cut.layers[:names.index("mixed0")]) if isinstance(l, keras.layers.MaxPooling2D))
    assert all(names.index(n) > stem_end for n in trainable())
    assert any(names.index(n) < names.index("mixed0") for n in trainable())  # mixed0's own branches
    assert not any(isinstance(l, keras.layers.BatchNormalization) and l.trainable for l in cut.layers)


# --- Reinhard stain normalisation: the model's first layer ---

def test_reinhard_normalisation_maps_each_image_to_the_target_stain():
    from idc.keras_model import ReinhardNormalization, view_array
    from idc.core.preprocessing import preprocess

    rng = np.random.default_rng(0)
    tissue = [stained_image(rng) for _ in range(4)]
    casts = [((1.0, 1.0, 1.0), (0, 0, 0)), ((0.85, 0.95, 1.05), (10, -5, 0)), ((1.05, 0.8, 0.9), (-8, 12, 6))]
    batches = [preprocess([restained(t, cast) for t in tissue], 75) for cast in casts]
    layer = ReinhardNormalization.fit(batches[:1])
    assert np.allclose(layer.target_mean, np.asarray(layer.image_stats(batches[0])[0]).mean(0))
    outputs = [np.asarray(layer(batch)) for batch in batches]
    for out in outputs:
        assert out.shape == batches[0].shape and -1 <= out.min() and out.max() <= 1
        mean, std = map(np.asarray, layer.image_stats(out))
        np.testing.assert_allclose(mean, np.broadcast_to(layer.target_mean, mean.shape), atol=0.02)
        np.testing.assert_allclose(std, np.broadcast_to(layer.target_std, std.shape), rtol=0.1)
    # the re-stained copies of one tissue come out far closer to each other than they went in
    before = np.abs(batches[1] - batches[2]).mean()
    after = np.abs(outputs[1] - outputs[2]).mean()
    assert after < before / 3
    # per-image statistics: a flipped or rotated image normalises to the flipped or rotated result
    for view in ("hflip", "rot90"):
        np.testing.assert_allclose(np.asarray(layer(view_array(batches[1], view))), view_array(outputs[1], view),
                                   atol=1e-5)
    # an image already at the target comes back as it was (up to the log's floor at 1/255)
    own = ReinhardNormalization(*map(lambda s: np.asarray(s)[0], layer.image_stats(batches[1][:1])))
    np.testing.assert_allclose(np.asarray(own(batches[1][:1])), batches[1][:1], atol=0.02)
    assert ReinhardNormalization.from_config(layer.get_config()).target_std == layer.target_std


def test_training_with_stain_normalisation_puts_it_in_the_model_and_every_ir(tmp_path):
    from idc.core.bundle import Bundle
    from idc.keras_model import load_keras_model, view_array
    from idc.edge.compile import check_parity, compile_ir
    from idc.training import data
    from idc.training.evaluation import feature_extractor

    make_dataset(tmp_path / "raw", patients=5, per_class=6)
    config = load_config(write_config(tmp_path, stain_normalization="reinhard", patch_cnn_epochs=1,
                                      train_views=["identity", "hflip"]))
    data.sort_dataset(tmp_path / "raw", config.model, validation_fraction=0.2, test_fraction=0.2, seed=0)
    train(config, trunk=tiny_trunk())
    bundle = Bundle.load(config.model.root)
    assert bundle.stain_normalization["method"] == "reinhard" and len(bundle.stain_normalization["target_std"]) == 3
    model = load_keras_model(config.model.keras_model)
    norm, head, trunk, cnn = (model.get_layer(n) for n in ("stain_normalization", "head", "tiny_trunk", "patch_cnn"))
    assert norm.target_mean == bundle.stain_normalization["target_mean"]
    batch = np.random.default_rng(1).uniform(-1, 1, (3, 75, 75, 3)).astype(np.float32)
    normalised = np.asarray(norm(batch))
    w = config.classifier.patch_cnn_weight
    expected = np.mean([(1 - w) * np.asarray(head(trunk(view_array(normalised, v))))
                        + w * np.asarray(cnn(view_array(normalised, v))) for v in ("identity", "hflip")], 0)
    np.testing.assert_allclose(np.asarray(model(batch)), expected, atol=1e-5)
    # the cached features are those of the normalised patches, under a key of their own
    np.testing.assert_allclose(np.asarray(feature_extractor(model)(batch)), np.asarray(trunk(normalised)), atol=1e-6)
    described = [json.loads(f.read_text())["weights"] for f in (config.model_dir / "bottlenecks").glob("*/trunk.json")]
    assert len(described) == 2 and all(d.startswith("custom:tiny_trunk; reinhard mean ") for d in described)
    assert evaluate(config, split="test", echo=lambda *_: None)["patches"] == len(config.model.read_manifest("test"))
    compile_ir(config, ["FP32"])
    assert check_parity(config, ["FP32"], echo=lambda *_: None)["FP32"]["max_abs_diff"] < 1e-4


def test_a_jpeg_view_is_a_reproducible_jpeg_round_trip(patches):
    digests = [f"{i:040x}" for i in range(len(patches))]
    first = augment.view_batch(patches, digests, "jpeg1", 75, seed=42)
    assert np.array_equal(first, augment.view_batch(patches, digests, "jpeg1", 75, seed=42))
    assert not np.array_equal(first, augment.view_batch(patches, digests, "jpeg2", 75, seed=42))
    assert first.shape == (len(patches), 75, 75, 3)
    # a real JPEG round trip: not the patch itself, but close to one of its flips or rotations
    rng = augment.view_rng(digests[0], "jpeg1", 42)
    compressed = augment.jpeg_compressed(patches[0], rng)
    assert compressed.shape == patches[0].shape and not np.array_equal(compressed, patches[0])
    assert np.abs(compressed.astype(int) - patches[0]).mean() < 25
    assert augment.describe_view("jpeg1", None, 42) != augment.describe_view("jpeg1", None, 7)  # keys the cache


def test_a_jpeg_round_trip_lies_at_a_random_block_phase(patches, monkeypatch):
    # a tile of a slide sits anywhere on the scanner's block grid: at one quality the round trips still differ
    monkeypatch.setattr(augment, "JPEG_QUALITY", (90, 90))
    draws = [augment.jpeg_compressed(patches[0], np.random.default_rng(seed)) for seed in range(8)]
    assert all(d.shape == patches[0].shape for d in draws)
    assert len({d.tobytes() for d in draws}) > 4
    assert max(np.abs(d.astype(int) - patches[0]).mean() for d in draws) < 25  # the patch, not another image


def test_jpeg_views_are_training_views_but_not_test_time_views(tmp_path):
    config = load_config(write_config(tmp_path, train_views=["identity", "hflip", "jpeg1"]))
    assert config.classifier.tta_views == ("identity", "hflip")
    with pytest.raises(ConfigError, match="JPEG views jpeg1"):
        load_config(write_config(tmp_path, train_views=["identity", "jpeg0"]))


def test_image_phases_compress_half_the_patches_when_a_jpeg_view_is_trained(patches):
    draws = [augment.augmented(patches[1], np.random.default_rng([1, 2, i]), None, jpeg=True) for i in range(40)]
    dihedral = [np.rot90(f, k) for f in (patches[1], patches[1][:, ::-1]) for k in range(4)]
    exact = sum(any(np.array_equal(d, v) for v in dihedral) for d in draws)
    assert 10 <= exact <= 30  # about half kept lossless (the rest compressed)
    plain = augment.augmented(patches[1], np.random.default_rng([1, 2, 0]), None)
    assert any(np.array_equal(plain, v) for v in dihedral)  # no JPEG without the flag


def test_per_slide_normalisation_leaves_the_model_and_normalises_each_patients_patches(tmp_path):
    """"slide": the bundle holds the training patients' typical stain; the model has no normaliser
    layer (a patch sent alone is classified as it is); evaluate.py normalises each patient's patches
    with the statistics of all of them, and the validation patients choose the rule the same way."""
    from idc.core.bundle import Bundle
    from idc.core.preprocessing import decode_image
    from idc.edge.engine import load_classifier
    from idc.keras_model import ReinhardNormalization, load_keras_model
    from idc.slides.stain import Stain, normalise, patient_stains
    from idc.training import data

    make_dataset(tmp_path / "raw", patients=5, per_class=6)
    config = load_config(write_config(tmp_path, stain_normalization="slide", train_views=["identity"],
                                      decision_rule_from_validation=True))
    data.sort_dataset(tmp_path / "raw", config.model, validation_fraction=0.2, test_fraction=0.2, seed=0)
    record = train(config, trunk=tiny_trunk())
    bundle = Bundle.load(config.model.root)
    training = config.model.read_manifest("train")
    stains = patient_stains(training)
    typical = Stain.typical(list(stains.values()))
    assert bundle.stain_normalization == {"method": "slide", "target_mean": list(typical.mean),
                                          "target_std": list(typical.std)}
    assert record["decision_rule"]["threshold_source"].startswith("validation")
    model = load_keras_model(config.model.keras_model)
    assert not any(isinstance(layer, ReinhardNormalization) for layer in model.layers)

    test = config.model.read_manifest("test")
    for x in test:  # the test patients come from another lab: the same tissue, another stain
        image = decode_image(x.path)
        x.path.unlink()  # a hard link to the raw dataset's file: the test split gets files of its own
        Image.fromarray(restained(image)).save(x.path)
    lines = []
    result = evaluate(config, split="test", echo=lines.append)
    assert any(line.startswith("Stain normalised per patient") for line in lines)
    engine, target = load_classifier(config, "keras"), Stain.from_bundle(bundle.stain_normalization)
    own = patient_stains(test)
    raw = [decode_image(x.path) for x in test]
    normalised = [normalise(image, own[x.patient], target) for image, x in zip(raw, test)]
    assert np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(normalised, raw)]) > 3  # it did change them
    expected = engine.probabilities(normalised)
    assert not np.allclose(expected, engine.probabilities(raw), atol=1e-3)  # so the check below can fail
    with (config.model.report_dir("test") / "predictions.csv").open() as f:
        got = {row["file"]: float(row["p_idc"]) for row in csv.DictReader(f)}
    np.testing.assert_allclose([got[str(x.path)] for x in test], expected, atol=1e-5)
    assert result["patches"] == len(test)


def test_a_jpeg_copy_is_paired_with_the_view_that_holds_it_uncompressed():
    # the head's scan invariance compares each compressed copy with the same pixels, uncompressed
    y, x = np.mgrid[:50, :50]  # smooth, and unlike any of its flips or rotations
    image = np.stack([x * 5, y * 5, ((x - 12) ** 2 + (y - 30) ** 2 < 100) * 200], -1).astype(np.uint8)
    views = ("identity", "hflip", "vflip", "rot90")
    digests = [f"{i:040x}" for i in range(40)]
    twins = [augment.view_twin(digest, "jpeg1", 42) for digest in digests]
    assert 10 <= twins.count(None) <= 30  # 4 of the 8 flips/rotations are views
    for digest, twin in zip(digests, twins):
        compressed = augment.view_batch([image], [digest], "jpeg1", 50, seed=42)[0]
        distance = {view: np.abs(compressed - augment.view_batch([image], [digest], view, 50)[0]).mean()
                    for view in views}
        nearest = sorted(distance, key=distance.get)
        if twin is not None:
            assert nearest[0] == twin and distance[twin] < distance[nearest[1]] / 2
        else:
            assert distance[nearest[0]] > 0.05  # another flip/rotation: none of the views holds its pixels


def test_a_blur_view_is_a_reproducible_blur_paired_with_the_view_that_holds_it_sharp(patches):
    digests = [f"{i:040x}" for i in range(len(patches))]
    first = augment.view_batch(patches, digests, "blur1", 50, seed=42)
    assert np.array_equal(first, augment.view_batch(patches, digests, "blur1", 50, seed=42))
    assert not np.array_equal(first, augment.view_batch(patches, digests, "blur2", 50, seed=42))
    assert augment.describe_view("blur1", None, 42) != augment.describe_view("blur1", None, 7)  # keys the cache
    twins = [augment.view_twin(digest, "blur1", 42) for digest in digests]
    assert any(twins)
    for index, (digest, twin) in enumerate(zip(digests, twins)):
        if twin is not None:  # the same pixels, blurred: smoother than the sharp view, and close to it
            sharp = augment.view_batch([patches[index]], [digest], twin, 50)[0]
            assert np.abs(np.diff(first[index], axis=0)).mean() < np.abs(np.diff(sharp, axis=0)).mean()
            assert np.abs(first[index] - sharp).mean() < 0.2


def test_image_phases_blur_half_the_patches_when_a_blur_view_is_trained(patches):
    draws = [augment.augmented(patches[1], np.random.default_rng([1, 2, i]), None, blur=True) for i in range(40)]
    dihedral = [np.rot90(f, k) for f in (patches[1], patches[1][:, ::-1]) for k in range(4)]
    sharp = sum(any(np.array_equal(d, v) for v in dihedral) for d in draws)
    assert 10 <= sharp <= 30  # about half kept sharp (the rest blurred)
