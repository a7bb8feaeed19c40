"""Train -> export -> reload -> evaluate, end to end on synthetic patches with a tiny trunk."""

import json

import numpy as np
import pytest

from idc.training import bottleneck, data
from idc.core.config import load_config, with_overrides
from idc.training.evaluation import evaluate
from idc.training.train import class_weights, train
from tests.synthetic import make_dataset, patch_image, tiny_trunk, write_config


@pytest.fixture(scope="module")
def trained(tiny_project):
    return tiny_project


def test_training_exports_model_classes_and_record(trained):
    config, record = trained
    assert config.model.keras_model.exists()
    assert (config.model_dir / "classes.txt").read_text() == "0 no IDC\n1 IDC\n"
    saved = json.loads((config.model_dir / "training.json").read_text())
    assert saved["data"]["train"]["patients"] == 6 and saved["data"]["validation"]["patients"] == 2
    # every training patch in each of the 5 views (4 flips/rotations and a JPEG copy); validation as it is
    assert saved["bottleneck_cache"]["train"]["computed"] == 6 * 16 * 5
    assert saved["bottleneck_cache"]["validation"]["computed"] == 2 * 16
    assert any((config.model_dir / "logs" / "head").rglob("events.out.tfevents.*"))
    assert (config.model_dir / "history_head.csv").exists()


def test_exported_model_beats_chance_on_held_out_patients(trained, capsys):
    config, _ = trained
    result = evaluate(config, split="test")
    out = capsys.readouterr().out
    assert "INFO:tensorflow:Final Streaming Accuracy:" in out and "INFO:tensorflow:Global Step 2: Streaming Accuracy:" in out
    assert "balanced_accuracy" in out and "95% CI [" in out and "average confidence of correct answers" in out
    assert result["patients"] == 2 and result["patches"] == 32
    assert result["balanced_accuracy"] >= 0.9  # separable classes: chance is 0.5
    report = config.model_dir / "reports" / "test"
    for name in ("metrics.json", "predictions.csv", "false_negatives.csv", "false_positives.csv",
                 "per_patient.csv", "confusion_matrix.png", "roc_curve.png", "precision_recall.png",
                 "training_curves.png", "index.html"):
        assert (report / name).stat().st_size > 0, name
    assert len((report / "predictions.csv").read_text().splitlines()) == 33
    for name in ("predictions.csv", "false_negatives.csv", "per_patient.csv"):  # Unix line endings
        assert b"\r" not in (report / name).read_bytes(), name
    assert b"\r" not in config.model.manifest.read_bytes()
    # TensorBoard: one folder per evaluated split (and precision), named after it, never after a CSV
    logs = {p.name for p in (config.model_dir / "logs").iterdir() if p.name.startswith("evaluation")}
    assert "evaluation_test" in logs and not [name for name in logs if name.endswith(".csv")], logs


def test_evaluate_any_folder_skips_corrupt_files(trained, tmp_path):
    config, _ = trained
    raw = make_dataset(tmp_path / "other", patients=2, per_class=3, seed=7)
    (raw / "9000" / "1" / "9000_idx5_x7_y7_class1.png").write_bytes(b"not a png")
    result = evaluate(config, data_dir=raw, report_dir=tmp_path / "report", echo=lambda *_: None)
    assert result["skipped"] == 1 and result["patches"] == 12


def test_second_run_reuses_the_bottleneck_cache(trained):
    config, _ = trained
    again = train(config, trunk=tiny_trunk())
    assert again["bottleneck_cache"]["train"] == {"hits": 96 * 5, "computed": 0}


def test_cache_invalidated_by_changed_image_and_size(tmp_path):
    trunk = tiny_trunk()
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        patch_image(i % 2, np.random.default_rng(i)).save(paths[-1])
    key = bottleneck.trunk_key("custom:tiny", ["mixed1"], "mean", 75)
    cache = bottleneck.BottleneckCache(tmp_path / "cache", key)
    first = cache.features(paths, trunk, 2, 75)
    assert (cache.hits, cache.misses) == (0, 3)
    reloaded = bottleneck.BottleneckCache(tmp_path / "cache", key)
    np.testing.assert_allclose(reloaded.features(paths, trunk, 2, 75), first)
    assert (reloaded.hits, reloaded.misses) == (3, 0)
    patch_image(1, np.random.default_rng(99)).save(paths[0])  # the image changed on disk
    reloaded.features(paths, trunk, 2, 75)
    assert (reloaded.hits, reloaded.misses) == (2, 1)
    assert bottleneck.trunk_key("custom:tiny", ["mixed1"], "mean", 99) != key
    assert bottleneck.trunk_key("custom:tiny", ["mixed2"], "mean", 75) != key
    assert bottleneck.trunk_key("custom:tiny", ["mixed1"], "mean+std", 75) != key
    assert bottleneck.trunk_key("custom:tiny", ["mixed1"], "mean", 75, "hflip") != key


def test_fine_tune_phase_runs_and_exports(tmp_path):
    make_dataset(tmp_path / "raw", patients=5, per_class=4)
    config = load_config(write_config(tmp_path, epochs=3, fine_tune_blocks=1, fine_tune_epochs=1))
    data.sort_dataset(tmp_path / "raw", config.model, validation_fraction=0.2, test_fraction=0.2, seed=0)
    record = train(config, trunk=tiny_trunk())
    assert len(record["fine_tune_history"]["loss"]) == 1
    assert (config.model_dir / "history_fine_tune.csv").exists() and config.model.keras_model.exists()


def test_patch_cnn_is_trained_and_weighted_with_the_head(tmp_path):
    from idc.core.bundle import Bundle
    from idc.keras_model import load_keras_model, view_array
    from idc.core.preprocessing import load_batch

    make_dataset(tmp_path / "raw", patients=5, per_class=6)
    config = load_config(write_config(tmp_path, epochs=3, patch_cnn_epochs=3, train_views=["identity", "hflip"]))
    data.sort_dataset(tmp_path / "raw", config.model, validation_fraction=0.2, test_fraction=0.2, seed=0)
    record = train(config, trunk=tiny_trunk())
    assert len(record["patch_cnn_history"]["loss"]) == 3
    bundle = Bundle.load(config.model.root)
    assert (config.model_dir / "history_patch_cnn.csv").exists() and bundle.patch_cnn
    weight = config.classifier.patch_cnn_weight
    assert bundle.patch_cnn_weight == weight == 0.25  # the default: the CNN's share of the answer
    model = load_keras_model(config.model.keras_model)
    head, trunk, cnn = model.get_layer("head"), model.get_layer("tiny_trunk"), model.get_layer("patch_cnn")
    batch = np.random.default_rng(1).uniform(-1, 1, (3, 75, 75, 3)).astype(np.float32)
    expected = np.mean([(1 - weight) * np.asarray(head(trunk(view_array(batch, v))))
                        + weight * np.asarray(cnn(view_array(batch, v))) for v in ("identity", "hflip")], 0)
    np.testing.assert_allclose(np.asarray(model(batch)), expected, atol=1e-5)
    # the patch CNN alone learned the (colour-separable) synthetic classes
    test = config.model.read_manifest("test")
    answers = np.argmax(np.asarray(cnn(load_batch([p.path for p in test], 75))), 1)
    assert (answers == np.array([p.label for p in test])).mean() >= 0.9
    assert evaluate(config, split="test", echo=lambda *_: None)["balanced_accuracy"] >= 0.9
    # the report's gallery compares patches in the trunk's feature space, not in the patch CNN's answers
    from idc.training.evaluation import feature_extractor

    assert feature_extractor(model) is trunk
    # the whole model (head and patch CNN under every view) compiles to OpenVINO and answers the same
    from idc.edge.compile import check_parity, compile_ir

    compile_ir(config, ["FP32"])
    assert check_parity(config, ["FP32"], echo=lambda *_: None)["FP32"]["max_abs_diff"] < 1e-4


def test_class_weights_balance_the_loss():
    weights = class_weights(np.array([0, 0, 0, 1]))
    assert weights[1] == 3 * weights[0]
    with pytest.raises(Exception, match="both classes"):
        class_weights(np.array([0, 0]))


def test_train_without_sorting_says_what_to_do(tmp_path):
    config = with_overrides(load_config(write_config(tmp_path)), "ClassifierSettings", model_dir=str(tmp_path / "none"))
    with pytest.raises(Exception, match="trainer.py sort"):
        train(config, trunk=tiny_trunk())


def test_views_match_between_numpy_and_the_model():
    from idc.keras_model import VIEWS, DihedralView, MeanOverViews, StackedViews, view_array

    batch = np.random.default_rng(0).random((2, 5, 5, 3)).astype(np.float32)
    for view in VIEWS:
        np.testing.assert_array_equal(np.asarray(DihedralView(view)(batch)), view_array(batch, view))
    assert len({view_array(batch, v).tobytes() for v in VIEWS}) == 4
    # the views as one batch, view after view, and back to one answer per image
    stacked = np.asarray(StackedViews(VIEWS)(batch))
    np.testing.assert_array_equal(stacked, np.concatenate([view_array(batch, v) for v in VIEWS]))
    answers = stacked.reshape(len(stacked), -1)[:, :3]
    np.testing.assert_allclose(np.asarray(MeanOverViews(len(VIEWS))(answers)),
                               np.mean([view_array(batch, v).reshape(2, -1)[:, :3] for v in VIEWS], 0), rtol=1e-6)


def test_tta_model_averages_the_views(trained):
    from idc.keras_model import load_keras_model
    from idc.keras_model import view_array

    config, _ = trained
    model = load_keras_model(config.model.keras_model)
    assert config.classifier.test_time_augmentation and model.get_layer("tta_mean")
    single = model.get_layer("head")
    trunk = model.get_layer("tiny_trunk")
    batch = np.random.default_rng(1).uniform(-1, 1, (3, 75, 75, 3)).astype(np.float32)
    expected = np.mean([np.asarray(single(trunk(view_array(batch, v)))) for v in config.classifier.tta_views], 0)
    np.testing.assert_allclose(np.asarray(model(batch)), expected, atol=1e-5)


def test_retraining_at_another_size_recomputes_the_bottlenecks(tmp_path):
    from idc.core.bundle import Bundle

    make_dataset(tmp_path / "raw", patients=4, per_class=3)
    config = load_config(write_config(tmp_path, epochs=2, train_views=["identity"]))
    data.sort_dataset(tmp_path / "raw", config.model, validation_fraction=0.25, test_fraction=0.0, seed=0)
    first = train(config, trunk=tiny_trunk(75))
    computed = first["bottleneck_cache"]["train"]["computed"]
    assert computed == 3 * 6
    # Same trunk identity, another input size: every feature must be computed again at that size.
    resized = with_overrides(config, "ClassifierSettings", image_size=80)
    again = train(resized, trunk=tiny_trunk(80))
    assert again["bottleneck_cache"]["train"] == {"hits": 0, "computed": computed}
    assert Bundle.load(config.model.root).image_size == 80
    from idc.core.errors import DatasetError

    with pytest.raises(DatasetError, match="the 'test' split in .* is empty"):  # test_fraction 0: no test patients
        evaluate(resized, split="test")


def test_balanced_accuracy_is_not_plain_accuracy_on_imbalanced_labels():
    from idc.core.metrics import classification_metrics

    result = classification_metrics([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4], threshold=0.5)
    assert result["accuracy"] == 0.75 and result["balanced_accuracy"] == 0.5
    assert (result["sensitivity"], result["specificity"]) == (0.0, 1.0)


def test_training_chooses_the_decision_rule_on_validation_patients(tmp_path, capsys):
    from idc.core.bundle import Bundle

    make_dataset(tmp_path / "raw", patients=6, per_class=6)
    config = load_config(write_config(tmp_path, epochs=5, train_views=["identity"],
                                      decision_rule_from_validation=True))
    data.sort_dataset(tmp_path / "raw", config.model, validation_fraction=0.34, test_fraction=0.17, seed=0)
    record = train(config, trunk=tiny_trunk())
    bundle = Bundle.load(config.model.root)
    assert bundle.threshold_source.startswith("validation: balanced accuracy") and "2 patients" in bundle.threshold_source
    assert record["decision_rule"]["threshold"] == bundle.threshold and 0.05 <= bundle.threshold <= 0.95
    validation = record["decision_rule"]["validation"]  # the band within review_share, and the trade-off
    assert validation["review_band"] == bundle.review_band and validation["share_flagged"] <= 0.1
    assert [row["threshold"] for row in validation["tradeoff"]][:2] == [0.1, 0.15]
    result = evaluate(config, split="test")
    assert result["threshold"] == bundle.threshold
    assert ("slide_context" in result) == (bundle.slide_context is not None)  # only where it helped on validation


def test_evaluation_reports_slide_context_beside_patch_alone(trained, tmp_path, capsys):
    import dataclasses
    import shutil

    from idc.core.bundle import Bundle
    from idc.core.config import with_overrides

    config, _ = trained
    copy = with_overrides(config, "ClassifierSettings", model_dir=str(tmp_path / "model"))
    shutil.copytree(config.model_dir, copy.model_dir, ignore=shutil.ignore_patterns("bottlenecks", "logs", "ir"))
    rule = {"radius": 1, "weight": 0.5, "threshold": 0.5, "validation_balanced_accuracy": 1.0}
    dataclasses.replace(Bundle.load(copy.model_dir), slide_context=rule).save(copy.model_dir)
    result = evaluate(copy, split="test", report_dir=tmp_path / "report")
    context = result["slide_context"]
    assert (context["radius"], context["weight"], context["threshold"]) == (1, 0.5, 0.5)
    assert context["patches"] == result["patches"] and set(context["intervals_95"]) >= {"balanced_accuracy", "f1_idc"}
    assert "With slide context (neighbours within 1 patches, weight 0.5) at threshold 0.5:" in capsys.readouterr().out

    # the learned rule, as a bundle may hold it instead
    from idc.core.context import learned_context

    learned = {"kind": "learned", "coefficients": [-0.5, 1.0, 1.5, 0.5], "threshold": 0.45}
    dataclasses.replace(Bundle.load(copy.model_dir), slide_context=learned).save(copy.model_dir)
    result = evaluate(copy, split="test", report_dir=tmp_path / "learned")
    assert result["slide_context"]["kind"] == "learned" and result["slide_context"]["threshold"] == 0.45
    import csv
    with (tmp_path / "learned" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    q = learned_context([r["patient"] for r in rows], [int(r["x"]) for r in rows], [int(r["y"]) for r in rows],
                        [float(r["p_idc"]) for r in rows], learned["coefficients"])
    labels = np.array([int(r["label"]) for r in rows])
    assert result["slide_context"]["sensitivity"] == pytest.approx((q[labels == 1] >= 0.45).mean(), abs=1e-4)
    assert "With slide context (learned from each patch's own and its neighbours' P(IDC))" in capsys.readouterr().out


def test_a_head_trained_for_scan_invariance_is_exported_as_a_plain_head(tmp_path):
    import zipfile

    from idc.keras_model import load_keras_model

    make_dataset(tmp_path / "raw", patients=5, per_class=4)
    kernels = {}
    for invariance in (0.0, 10.0):
        (tmp_path / str(invariance)).mkdir()
        config = load_config(write_config(tmp_path / str(invariance), epochs=3, scan_invariance=invariance,
                                          head_hidden_units=0, train_views=["identity", "hflip", "jpeg1"]))
        data.sort_dataset(tmp_path / "raw", config.model, validation_fraction=0.2, test_fraction=0.2, seed=0)
        train(config, trunk=tiny_trunk())
        saved = zipfile.ZipFile(config.model.keras_model).read("config.json").decode()
        assert "ShiftPenalty" not in saved  # the penalty trains the layer; the model needs nothing new to load
        model = load_keras_model(config.model.keras_model)
        kernels[invariance] = np.asarray(model.get_layer("head").get_layer("idc_softmax").kernel)
    assert not np.allclose(kernels[0.0], kernels[10.0], atol=1e-3)  # the penalty changed what was learned
