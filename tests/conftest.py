"""Shared fixtures. Real components: synthetic PNGs on disk, a real mosquitto, real servers."""

import pytest

from tests.broker import started_broker
from tests.paths import ROOT

# --- MQTT: a real mosquitto broker (tests/mosquitto.py, tests/broker.py), test configs, gpiozero mock pins ---

@pytest.fixture
def mosquitto(tmp_path):
    """A real anonymous mosquitto on 127.0.0.1 at a free port; .stop()/.start()/.restart() it at will."""
    broker = started_broker(tmp_path / "mosquitto")
    yield broker
    broker.stop()


@pytest.fixture
def mosquitto_persistent(tmp_path):
    """Like `mosquitto`, but sessions and queued QoS 1 messages survive a restart."""
    broker = started_broker(tmp_path / "mosquitto", persistence=True)
    yield broker
    broker.stop()


@pytest.fixture
def mosquitto_auth(tmp_path):
    """A real mosquitto with a password file (tests.mosquitto.TEST_USERS) that refuses anonymous clients."""
    from tests.mosquitto import TEST_USERS

    broker = started_broker(tmp_path / "mosquitto-auth", users=TEST_USERS)
    yield broker
    broker.stop()


@pytest.fixture
def make_config(tmp_path):
    """make_config(broker=None, **sections) -> Config: the project's confs.json, pointed at `broker`
    (MQTT enabled) and with the given keys of each section changed, written to tmp_path and loaded."""
    import json

    from idc.core.config import load_config

    def make(broker=None, name: str = "confs.json", **sections):
        raw = json.loads((ROOT / "confs.json").read_text())
        if broker is not None:
            raw["IoTJumpWay"].update(host=broker.host, port=broker.port, enabled=True)
        for section, changes in sections.items():
            raw[section].update(changes)
        path = tmp_path / name
        path.write_text(json.dumps(raw, indent=2))
        return load_config(path)

    return make


@pytest.fixture
def mock_pins():
    """gpiozero's MockFactory as the default pin factory for one test, reset afterwards."""
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    previous = Device.pin_factory
    Device.pin_factory = factory = MockFactory()
    yield factory
    factory.reset()
    Device.pin_factory = previous


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """A project with a sorted synthetic dataset and a trained tiny model (trunk stand-in)."""
    from idc.training import data
    from idc.core.config import load_config
    from idc.training.train import train
    from tests.synthetic import make_dataset, tiny_trunk, write_config

    tmp = tmp_path_factory.mktemp("project")
    make_dataset(tmp / "raw", patients=10, per_class=8)
    config = load_config(write_config(tmp, dataset_dir=str(tmp / "raw")))
    data.sort_dataset(tmp / "raw", config.model, validation_fraction=0.2, test_fraction=0.2, seed=1)
    record = train(config, trunk=tiny_trunk())
    return config, record


# --- HTTP API: the tiny model compiled to OpenVINO IR, and real waitress servers in threads ---

@pytest.fixture(scope="session")
def tiny_classifier(tiny_project):
    """The tiny project's model as the server loads it: FP16 OpenVINO IR (compiled once if absent)."""
    from idc.edge.compile import compile_ir
    from idc.edge.engine import load_classifier

    config, _ = tiny_project
    if not config.model.ir_xml("FP16").exists():
        compile_ir(config, ["FP16"])
    return load_classifier(config, "FP16")


@pytest.fixture
def live_server():
    """live_server(app, config) -> "http://127.0.0.1:<port>": `app` on a real waitress server (the
    production settings of idc.edge.web.serving.create_waitress_server) at a free port, run in a thread and
    shut down (threads joined, port closed) after the test."""
    import threading

    from waitress import wasyncore

    from idc.edge.web.serving import create_waitress_server

    running = []

    def start(app, config) -> str:
        server = create_waitress_server(app, config, host="127.0.0.1", port=0)
        thread = threading.Thread(target=server.run, name="waitress-test", daemon=True)
        thread.start()
        running.append((server, thread))
        return f"http://127.0.0.1:{server.effective_port}"

    yield start
    for server, thread in running:
        # Close every socket from inside the server's own loop; the loop ends when none is left.
        try:
            server.trigger.pull_trigger(lambda server=server: wasyncore.close_all(server._map))
        except OSError:
            # The trigger's pipe is gone (seen once on CI, EBADF, cause not found): close the sockets
            # from here instead; the loop sees an empty map at its next poll (1 s) and ends.
            wasyncore.close_all(server._map)
        thread.join(timeout=10)
        server.task_dispatcher.shutdown(timeout=10)
        assert not thread.is_alive(), "the waitress test server did not stop"


# --- Real data: a small model trained on real patches and the real Inception V3 trunk (../shared) ---

def real_subset(folder, patients_per_split=(14, 3, 4), per_class=20):
    """A few hundred real patches in the Kaggle layout (symlinks), from patients of the reference
    train/extra and val lists, so the test covers several patients per split."""
    import csv
    import os

    from tests.paths import SHARED_DATA, SHARED_PATIENTS, require_shared

    require_shared(SHARED_DATA)
    require_shared(SHARED_PATIENTS)
    rows = list(csv.DictReader(SHARED_PATIENTS.open()))
    # patients with both classes, so every split holds IDC and non-IDC patches
    both = [r["patient_id"] for r in rows if int(r["negatives"]) >= per_class and int(r["positives"]) >= per_class]
    chosen = both[:sum(patients_per_split)]
    for patient in chosen:
        for label in ("0", "1"):
            target = folder / patient / label
            target.mkdir(parents=True)
            for source in sorted((SHARED_DATA / patient / label).glob("*.png"))[:per_class]:
                os.symlink(source, target / source.name)
    return folder, chosen


@pytest.fixture(scope="session")
def real_project(tmp_path_factory):
    """(config, sort report, training record) of a model trained at 75 px on 21 real patients' patches
    (20 a class each) with the real trunk; skipped where ../shared is absent."""
    from idc.core.config import load_config
    from idc.training import data
    from idc.training.train import train
    from tests.paths import SHARED_WEIGHTS, require_shared
    from tests.synthetic import write_config

    require_shared(SHARED_WEIGHTS)
    tmp = tmp_path_factory.mktemp("real")
    raw, _ = real_subset(tmp / "raw")
    config = load_config(write_config(
        tmp, dataset_dir=str(raw), weights=str(SHARED_WEIGHTS), image_size=75, batch_size=32,
        head_batch_size=64, learning_rate=0.001, epochs=60, early_stopping_patience=10))
    report = data.sort_dataset(raw, config.model, validation_fraction=0.15, test_fraction=0.2, seed=3)
    record = train(config)
    return config, report, record
