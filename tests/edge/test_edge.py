"""OpenVINO compilation (FP16, INT8), parity with TensorFlow, the engine, inception_test.py."""

import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from idc.core.config import with_overrides
from idc.core.errors import DeviceError, ImageError
from idc.keras_model import load_keras_model
from idc.core.preprocessing import load_batch
from idc.edge.compile import check_parity, compile_ir
from idc.edge.engine import KerasClassifier, OpenVINOClassifier, load_classifier, served_precision
from tests.paths import ROOT


@pytest.fixture(scope="module")
def compiled(tiny_project):
    config, _ = tiny_project
    paths = compile_ir(config, ["FP32", "FP16", "INT8"])
    return config, paths


def test_ir_files_written(compiled):
    config, paths = compiled
    for precision in ("FP16", "INT8"):
        xml = paths[precision]
        assert xml == config.model.ir_xml(precision)
        assert xml.stat().st_size > 0 and xml.with_suffix(".bin").stat().st_size > 0
        assert (xml.parent / "model.json").exists()
    assert "FakeQuantize" in paths["INT8"].read_text() and "FakeQuantize" not in paths["FP16"].read_text()


def test_parity_with_tensorflow(compiled):
    config, _ = compiled
    report = check_parity(config, ["FP16", "INT8"], echo=lambda *_: None)
    assert report["FP16"]["max_abs_diff"] < 0.01 and report["FP16"]["agreement"] == 1.0
    assert report["INT8"]["agreement"] >= 0.95
    assert (config.model_dir / "ir" / "parity.json").exists()


def test_engine_matches_keras_on_test_patches(compiled):
    config, _ = compiled
    engine = OpenVINOClassifier(config.model.ir_xml("FP16"), "CPU")
    keras_engine = KerasClassifier(config.model.keras_model)
    for patch in config.model.read_manifest("test")[:6]:
        ov_result, tf_result = engine.classify(patch.path), keras_engine.classify(patch.path.read_bytes())
        assert ov_result.label == tf_result.label == patch.label
        assert abs(ov_result.p_idc - tf_result.p_idc) < 0.01
    # the same preprocessing as training: equal to the Keras model on load_batch()
    paths = [p.path for p in config.model.read_manifest("test")[:4]]
    reference = np.asarray(load_keras_model(config.model.keras_model)(load_batch(paths, engine.image_size)))[:, 1]
    np.testing.assert_allclose(engine._infer(load_batch(paths, engine.image_size)), reference, atol=0.01)


def test_engines_match_the_training_path_to_1e_5(compiled):
    """The served P(IDC) equals the P(IDC) of the trained model on the training/evaluation
    preprocessing (load_batch), file by file: a channel swap or another resize in the engine
    moves P(IDC) by far more than this."""
    config, _ = compiled
    paths = [p.path for p in config.model.read_manifest("test")]
    model = load_keras_model(config.model.keras_model)
    reference = np.asarray(model.predict_on_batch(load_batch(paths, 75)))[:, 1]
    assert ((reference > 1e-3) & (reference < 0.999)).any()  # not all saturated: a difference would show
    for engine in (KerasClassifier(config.model.keras_model), OpenVINOClassifier(config.model.ir_xml("FP32"), "CPU")):
        served = np.array([engine.classify(path).p_idc for path in paths])
        np.testing.assert_allclose(served, reference, atol=1e-5, rtol=0, err_msg=engine.backend)


def test_a_worse_int8_model_fails_the_parity_gate(compiled, tmp_path):
    import openvino as ov
    from openvino import opset13

    from idc.core.errors import ParityError

    copy, _ = model_copy(compiled[0], tmp_path)
    # A "quantized" model that swaps the classes: what a broken calibration could produce.
    good = ov.Core().read_model(copy.model.ir_xml("INT8"))
    swapped = opset13.subtract(opset13.constant(np.float32(1.0)), good.get_results()[0].input_value(0))
    worse = tmp_path / "worse.xml"  # not over the files read: their weights are memory-mapped
    ov.save_model(ov.Model([swapped], good.get_parameters(), "worse"), worse)
    for suffix in (".xml", ".bin"):
        worse.with_suffix(suffix).replace(copy.model.ir_xml("INT8").with_suffix(suffix))
    with pytest.raises(ParityError, match=r"INT8 loses [01]\.[0-9]+ balanced accuracy"):
        check_parity(copy, ["FP16", "INT8"], echo=lambda *_: None)
    # Removed: "auto" (the default precision) never serves an INT8 IR that failed the gate.
    assert not copy.model.ir_xml("INT8").exists() and copy.model.ir_xml("FP16").exists()
    assert served_precision(copy) == "FP16" and load_classifier(copy).precision == "FP16"


def model_copy(config, tmp_path):
    """The compiled model copied to tmp_path/model (tests that change it leave the module's alone), and
    a confs.json pointing at it, for the scripts."""
    copy = with_overrides(config, "ClassifierSettings", model_dir=str(tmp_path / "model"))
    shutil.copytree(config.model_dir, copy.model_dir, ignore=shutil.ignore_patterns("bottlenecks", "logs"))
    raw = json.loads(config.path.read_text())
    raw["ClassifierSettings"]["model_dir"] = str(copy.model_dir)
    (tmp_path / "confs.json").write_text(json.dumps(raw))
    return copy, tmp_path / "confs.json"


def test_compile_script_exits_non_zero_when_int8_fails_the_gate(compiled, tmp_path):
    _, copy = model_copy(compiled[0], tmp_path)
    # Demanding that INT8 be 1.0 better than TensorFlow makes any INT8 model fail the gate.
    done = subprocess.run(["bash", str(ROOT / "compile_ncs.sh"), "--config", str(copy), "--precision", "int8",
                           "--max-int8-drop", "-1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error: INT8 loses" in done.stderr and "TASS Identified" not in done.stdout
    assert not (tmp_path / "model" / "ir" / "INT8").exists()


def test_the_default_precision_compiles_fp16_and_int8_and_serves_int8_on_a_cpu(compiled, tmp_path):
    config, _ = compiled
    assert config.OpenVINO.precision == "auto" and config.OpenVINO.device == "CPU"  # the shipped defaults
    copy, path = model_copy(config, tmp_path)
    shutil.rmtree(copy.model_dir / "ir")
    done = subprocess.run(["bash", str(ROOT / "compile_ncs.sh"), "--config", str(path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FP16: agreement" in done.stdout and "INT8: agreement" in done.stdout
    assert "Serving INT8 on CPU (OpenVINO.precision auto)" in done.stdout
    assert "inception-v3 on CPU" in done.stdout  # inception_test.py ran on the served IR
    assert served_precision(copy) == "INT8" and load_classifier(copy).precision == "INT8"
    # A GPU or NPU runs FP16 natively: "auto" serves FP16 there (the choice alone: no GPU here).
    assert served_precision(with_overrides(copy, "OpenVINO", device="GPU")) == "FP16"


def test_engine_is_thread_safe(compiled):
    config, _ = compiled
    engine = load_classifier(config, "INT8")
    patches = config.model.read_manifest("test")
    expected = {p.path: engine.classify(p.path).p_idc for p in patches}
    errors = []

    def worker():
        for patch in patches:
            if abs(engine.classify(patch.path).p_idc - expected[patch.path]) > 1e-6:
                errors.append(patch.path)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)


def test_review_flag_near_threshold(compiled):
    config, _ = compiled
    engine = load_classifier(config, "FP16")
    assert engine.threshold == 0.54  # the bundle's, from training
    # 0.52: between 0.5 and the threshold, so a rule that compared with 0.5 would say IDC.
    for p, label, review in ((0.52, 0, True), (0.54, 1, True), (0.60, 1, True), (0.90, 1, False), (0.05, 0, False)):
        engine._infer = lambda batch, p=p: np.array([p], np.float32)
        result = engine.classify(config.model_dir / "test" / "positive.png")
        assert (result.label, result.needs_review) == (label, review), p


def test_bad_images_raise_image_error(compiled):
    config, _ = compiled
    engine = load_classifier(config, "FP16")
    for payload in (b"", b"\x89PNG\r\n\x1a\ntruncated", b"GIF89a" + bytes(20)):
        with pytest.raises(ImageError):
            engine.classify(payload)


def test_missing_device_is_explained(compiled):
    config, _ = compiled
    with pytest.raises(DeviceError, match="MYRIAD.*2022.3.*this machine has: .*CPU"):
        load_classifier(with_overrides(config, "OpenVINO", device="MYRIAD"), "FP16")


def test_fallback_to_keras_without_ir(tiny_project, tmp_path, caplog):
    import shutil

    config, _ = tiny_project
    config = with_overrides(config, "ClassifierSettings", model_dir=str(tmp_path / "model"))
    shutil.copytree(tiny_project[0].model_dir, config.model_dir, ignore=shutil.ignore_patterns("ir", "bottlenecks"))
    engine = load_classifier(config, "FP32")  # never compiled here
    assert engine.backend == "keras" and "falling back to the Keras model" in caplog.text


def run_inception_test(config, *args):
    return subprocess.run([sys.executable, str(ROOT / "inception_test.py"), "--config", str(config.path), *args],
                          capture_output=True, text=True, timeout=120)


def test_inception_test_script(compiled):
    config, _ = compiled
    done = run_inception_test(config, "--precision", "INT8")
    assert done.returncode == 0, done.stderr
    assert "Loaded Test Image" in done.stdout and "positive.png" in done.stdout
    assert "TASS Identified IDC with a confidence of" in done.stdout
    assert done.stdout.count("TASS Identified") == 1  # as in the article: for the IDC image only
    assert done.stdout.count("inception-v3 on CPU") == 2 and "-- TESTED:  2" in done.stdout
    assert "Tested 2 images" in done.stdout and "unreadable: 0" in done.stdout


def test_inception_test_fails_on_a_corrupt_image(compiled, tmp_path):
    config, _ = compiled
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    done = run_inception_test(config, "--precision", "FP16", str(config.model_dir / "test" / "positive.png"), str(bad))
    assert done.returncode == 1
    assert "Could not read" in done.stdout and "unreadable: 1" in done.stdout and "IDC: 1" in done.stdout


def test_compile_script_help():
    done = subprocess.run(["bash", str(ROOT / "compile_ncs.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "--precision" in done.stdout
    done = subprocess.run(["bash", str(ROOT / "compile_ncs.sh"), "--precision", "FP8"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "unknown precision" in done.stderr


def test_compile_checks_the_device_before_touching_the_irs(compiled):
    config, _ = compiled
    xml = config.model.ir_xml("FP16")
    before = xml.stat().st_mtime_ns
    done = subprocess.run(["bash", str(ROOT / "compile_ncs.sh"), "--config", str(config.path), "--precision", "fp16",
                           "--device", "MYRIAD"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "MYRIAD" in done.stderr and "2022.3" in done.stderr, done.stderr
    assert xml.stat().st_mtime_ns == before  # not rebuilt, not overwritten


def test_scripts_start_quietly(compiled):
    """No TensorFlow start-up noise (absl, oneDNN, cuInit on a machine without CUDA) without -v."""
    config, _ = compiled
    done = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--config", str(config.path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for noise in ("absl::InitializeLog", "oneDNN", "cuInit", "cuda", "E0000", "I0000"):
        assert noise not in done.stderr, done.stderr


def test_inception_test_publishes_results_to_mqtt(compiled, mosquitto, make_config):
    import dataclasses
    import json

    from tests.mosquitto import Probe

    config, _ = compiled
    # It publishes as its own device (IoTJumpWay.Tester), never as the edge server.
    probe = Probe(mosquitto, topics=["IDC/Devices/Lab/#"])
    try:
        published = make_config(mosquitto, ClassifierSettings=dataclasses.asdict(config.classifier))
        done = run_inception_test(published, "--precision", "FP16")
        assert done.returncode == 0, done.stdout + done.stderr
        assert not [t for t, _, _ in probe.messages if "/EdgeServer/" in t]
        sensors = [json.loads(p) for p in probe.received("IDC/Devices/Lab/InceptionTest/Sensors")]
        warnings = [json.loads(p) for p in probe.received("IDC/Devices/Lab/InceptionTest/Warnings")]
        assert sorted(s["Results"] for s in sensors) == [0, 1]
        assert all(s["Sensor"] == "CCTV" and s["SensorValue"].startswith(f"IDC: {s['Results']} (Confidence: ")
                   for s in sensors)
        assert len(warnings) == 1 and warnings[0]["WarningValue"] == "RECOGNISED"
    finally:
        probe.close()


def test_inception_test_with_the_broker_down_warns_but_succeeds(compiled, mosquitto, make_config):
    import dataclasses

    config, _ = compiled
    published = make_config(mosquitto, ClassifierSettings=dataclasses.asdict(config.classifier))
    mosquitto.stop()
    done = run_inception_test(published, "--precision", "FP16")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "TASS Identified IDC" in done.stdout and "unreachable; results not published" in done.stdout
