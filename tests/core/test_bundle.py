"""The model bundle (model.json): one source of truth for the trained model's settings, read by
evaluation, compile, the engine and the scripts; per-machine import rules; bad overrides."""

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest

from idc.core.bundle import Bundle, ModelDir
from idc.core.config import load_config, with_overrides
from idc.core.errors import ModelNotFoundError
from idc.edge.engine import load_classifier
from idc.training.evaluation import evaluate
from tests.paths import ROOT


@pytest.fixture(scope="module")
def compiled_fp16(tiny_project, tiny_classifier):
    return tiny_project[0]  # tiny_classifier compiled the FP16 IR


def edited_config(config, tmp_path, **classifier):
    """The tiny project's confs.json, edited after training."""
    raw = json.loads(config.path.read_text())
    raw["ClassifierSettings"].update(classifier)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(raw))
    return load_config(path)


def test_training_writes_the_bundle(tiny_project):
    config, _ = tiny_project
    bundle = Bundle.load(config.model.root)
    assert (bundle.model_name, bundle.image_size, bundle.feature_layers, bundle.pooling) == (
        "DevCloudIDC", 75, ["mixed0", "mixed1"], "mean+std")
    assert bundle.train_views == ["identity", "hflip", "vflip", "rot90", "jpeg1"] and bundle.test_time_augmentation
    assert (bundle.threshold, bundle.review_band, bundle.precision) == (0.54, 0.1, None)
    assert bundle.classes == {"0": "no IDC", "1": "IDC"} and bundle.weights == "custom:tiny_trunk"
    assert bundle.data_fingerprint == config.model.fingerprint() and len(bundle.data_fingerprint) == 40
    assert bundle.preprocessing_version == 1 and bundle.project_version and bundle.created_at


def test_each_ir_carries_the_bundle_with_its_precision(compiled_fp16):
    config = compiled_fp16
    trained, ir = Bundle.load(config.model.root), Bundle.load(config.model.ir_dir("FP16"))
    assert ir.precision == "FP16" and ir.compiled_with
    assert dataclasses.replace(ir, precision=None, compiled_with=None) == trained


def test_editing_confs_json_after_training_changes_neither_size_nor_rule(compiled_fp16, tmp_path):
    edited = edited_config(compiled_fp16, tmp_path, image_size=150, InceptionThreshold=0.9, review_band=0.3)
    for precision in ("FP16", "keras"):
        engine = load_classifier(edited, precision)
        assert (engine.image_size, engine.threshold, engine.review_band) == (75, 0.54, 0.1)
        assert engine.rule_source == "model.json"
    result = evaluate(edited, split="test", report_dir=tmp_path / "report", echo=lambda *_: None)
    assert result["threshold"] == 0.54 and result["model"]["image_size"] == 75


def test_the_rule_is_overridden_only_on_purpose_and_says_so(compiled_fp16, tmp_path):
    edited = edited_config(compiled_fp16, tmp_path, threshold_override=0.7)
    engine = load_classifier(edited, "FP16")
    assert (engine.threshold, engine.review_band) == (0.7, 0.1)
    assert engine.rule_source == "threshold from confs.json threshold_override, the rest from model.json"
    flagged = load_classifier(edited, "FP16", threshold=0.6, review_band=0.05)
    assert (flagged.threshold, flagged.review_band) == (0.6, 0.05)
    assert flagged.rule_source == "threshold from --threshold, review_band from --review-band, the rest from model.json"
    result = evaluate(edited, split="test", report_dir=tmp_path / "report", echo=lambda *_: None, threshold=0.6)
    assert result["threshold"] == 0.6


def test_evaluate_runs_the_compiled_ir_on_the_same_patients(compiled_fp16, tmp_path):
    lines = []
    keras = evaluate(compiled_fp16, split="test", report_dir=tmp_path / "keras", echo=lines.append)
    fp16 = evaluate(compiled_fp16, split="test", report_dir=tmp_path / "fp16", echo=lines.append, precision="FP16")
    assert keras["model"]["backend"] == "keras" and fp16["model"]["backend"] == "openvino-FP16"
    assert fp16["patches"] == keras["patches"] and abs(fp16["balanced_accuracy"] - keras["balanced_accuracy"]) < 0.05
    assert any(line.startswith("Evaluating openvino-FP16 (75 px") for line in lines)
    # A copy without INT8: the shared project has one once test_edge.py has compiled it.
    copy = with_overrides(compiled_fp16, "ClassifierSettings", model_dir=str(tmp_path / "model"))
    shutil.copytree(compiled_fp16.model_dir, copy.model_dir, ignore=shutil.ignore_patterns("bottlenecks", "logs", "INT8"))
    with pytest.raises(ModelNotFoundError, match="no INT8 IR.*compile_ncs.sh --precision INT8"):
        evaluate(copy, split="test", report_dir=tmp_path / "int8", precision="INT8")


def test_a_model_directory_without_a_bundle_says_what_to_do(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no trained model in .* run `python trainer.py train`"):
        Bundle.load(tmp_path)
    (tmp_path / "model.json").write_text('{"image_size": 75}')
    with pytest.raises(ModelNotFoundError, match="not a valid model bundle .*missing"):
        Bundle.load(tmp_path)


def test_model_dir_layout():
    model = ModelDir("/m", "Net")
    assert str(model.keras_model) == "/m/Net.keras" and str(model.ir_xml("INT8")) == "/m/ir/INT8/Net.xml"
    assert str(model.bundle_file) == "/m/model.json" and str(model.report_dir("test")) == "/m/reports/test"


# --- each machine imports only what it installs ---

def run_without(modules: list[str], script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a script in a Python where importing any of `modules` fails (as on a device without them)."""
    blocker = ("import runpy, sys\n"
               f"for name in {modules!r}: sys.modules[name] = None\n"
               f"sys.argv = [{script!r}] + sys.argv[1:]\n"
               f"runpy.run_path({script!r}, run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", blocker, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


TRAINING_ONLY = ["tensorflow", "keras", "tf_keras", "tensorflow_hub", "sklearn", "matplotlib", "nncf", "tqdm"]
EDGE_ONLY = ["numpy", "PIL", "openvino", "flask", "waitress", "werkzeug"]


def test_inception_test_runs_the_ir_without_tensorflow(compiled_fp16):
    done = run_without(TRAINING_ONLY, "inception_test.py", "--config", str(compiled_fp16.path), "--precision", "FP16")
    assert done.returncode == 0, done.stdout + done.stderr
    # The article's lines: a TASS line for the IDC image only, the top-2 classes for both.
    assert "TASS Identified IDC" in done.stdout and done.stdout.count("inception-v3 on CPU") == 2


def test_server_serves_the_ir_without_tensorflow(compiled_fp16, tmp_path):
    import os
    import signal

    import requests

    from tests.mosquitto import free_port, wait_until

    port = free_port()
    blocker = ("import runpy, sys\n"
               f"for name in {TRAINING_ONLY!r}: sys.modules[name] = None\n"
               "sys.argv = ['server.py'] + sys.argv[1:]\n"
               "runpy.run_path('server.py', run_name='__main__')\n")
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen([sys.executable, "-c", blocker, "--config", str(compiled_fp16.path),
                                    "--port", str(port), "--precision", "FP16"], cwd=ROOT,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    try:
        def answered():
            try:
                return requests.get(f"http://127.0.0.1:{port}/api/health", timeout=2).ok
            except requests.ConnectionError:
                return process.poll() is not None
        assert wait_until(answered, 60, 0.2) and process.poll() is None, log_path.read_text()
        image = compiled_fp16.model.example(1).read_bytes()
        answer = requests.post(f"http://127.0.0.1:{port}/api/infer", data=image, timeout=10).json()
        assert answer["Response"] == "OK" and answer["Results"] == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def test_alarm_and_client_run_without_numpy_or_the_edge_stack(tmp_path):
    blocked = TRAINING_ONLY + EDGE_ONLY
    done = run_without(blocked, "client.py", "--server", "http://127.0.0.1:9", "--timeout", "1",
                       str(ROOT / "confs.json"), timeout=60)
    assert "ModuleNotFoundError" not in done.stderr and "ImportError" not in done.stderr, done.stderr
    assert done.returncode == 1 and "failed: 1" in done.stdout  # a refused connection, not an import error
    import_only = ("import sys\n"
                   f"for name in {blocked!r}: sys.modules[name] = None\n"
                   "import idc.iot.alarm, idc.iot.mqtt, idc.core.config, idc.core.bundle, idc.core.cli, idc.core.files\n"
                   "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", import_only], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.stdout.strip() == "ok", done.stderr


def test_nothing_under_edge_or_iot_imports_training_code():
    """Static check of the import graph (the subprocess tests above check it at run time)."""
    import ast

    for machine, forbidden in (("edge", ("idc.training",)), ("iot", ("idc.training", "idc.edge", "numpy",
                                                                       "tensorflow", "keras", "openvino"))):
        for path in (ROOT / "idc" / machine).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                bad = [n for n in names if n.startswith(forbidden)]
                assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


# --- bad command-line overrides: one line, exit 2, naming the option ---

@pytest.mark.parametrize("script, args, says", [
    ("server.py", ["--port", "70000"], "--port 70000: must be a TCP port number"),
    ("trainer.py", ["sort", "--image-size", "50"], "--image-size 50: Inception V3 needs 75..1024 px"),
    ("trainer.py", ["sort", "--image-size", "abc"], "argument --image-size: invalid int value: 'abc'"),
    ("trainer.py", ["sort", "--samples-per-class", "many"], "argument --samples-per-class"),
    ("evaluate.py", ["--threshold", "1.5"], "argument --threshold: 1.5 is not in (0.0, 1.0)"),
    ("server.py", ["--precision", "FP8"], "argument --precision: invalid choice: 'FP8'"),
])
def test_a_bad_override_is_one_line_and_exit_2(script, args, says, tmp_path):
    from tests.synthetic import write_config

    config = write_config(tmp_path)  # a model directory of its own: nothing remembered from other runs
    done = subprocess.run([sys.executable, str(ROOT / script), *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr
