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
        server.trigger.pull_trigger(lambda server=server: wasyncore.close_all(server._map))
        thread.join(timeout=10)
        server.task_dispatcher.shutdown(timeout=10)
        assert not thread.is_alive(), "the waitress test server did not stop"
