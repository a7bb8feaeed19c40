"""Shared fixtures. Real components: synthetic PNGs on disk, a real mosquitto, real servers."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data" / "idc-patches"
SHARED_PATIENTS = SHARED / "data" / "idc-patches-patients.csv"
SHARED_WEIGHTS = SHARED / "weights" / "inception_v3_notop.weights.h5"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def require_shared(path: Path) -> Path:
    """Skip (with the reason) when a file from ../shared is absent, e.g. on a fresh clone elsewhere."""
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the shared real data/weights beside the project")
    return path


# --- MQTT: a real mosquitto broker (tests/mosquitto.py), test configs, gpiozero mock pins ---

def _started_broker(workdir: Path, **options):
    from tests.mosquitto import Mosquitto, find_tool

    for tool in ("mosquitto", "mosquitto_passwd") if options.get("users") else ("mosquitto",):
        if find_tool(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: apt-get install mosquitto): MQTT tests need a real broker")
    broker = Mosquitto(workdir, **options)
    broker.start()
    return broker


@pytest.fixture
def mosquitto(tmp_path):
    """A real anonymous mosquitto on 127.0.0.1 at a free port; .stop()/.start()/.restart() it at will."""
    broker = _started_broker(tmp_path / "mosquitto")
    yield broker
    broker.stop()


@pytest.fixture
def mosquitto_persistent(tmp_path):
    """Like `mosquitto`, but sessions and queued QoS 1 messages survive a restart."""
    broker = _started_broker(tmp_path / "mosquitto", persistence=True)
    yield broker
    broker.stop()


@pytest.fixture
def mosquitto_auth(tmp_path):
    """A real mosquitto with a password file (tests.mosquitto.TEST_USERS) that refuses anonymous clients."""
    from tests.mosquitto import TEST_USERS

    broker = _started_broker(tmp_path / "mosquitto-auth", users=TEST_USERS)
    yield broker
    broker.stop()


@pytest.fixture
def make_config(tmp_path):
    """make_config(broker=None, **sections) -> Config: the project's confs.json, pointed at `broker`
    (MQTT enabled) and with the given keys of each section changed, written to tmp_path and loaded."""
    import json

    from idc.config import load_config

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
    from idc import data
    from idc.config import load_config
    from idc.training import train
    from tests.synthetic import make_dataset, tiny_trunk, write_config

    tmp = tmp_path_factory.mktemp("project")
    make_dataset(tmp / "raw", patients=10, per_class=8)
    config = load_config(write_config(tmp, dataset_dir=str(tmp / "raw")))
    data.sort_dataset(tmp / "raw", config.model_dir, validation_fraction=0.2, test_fraction=0.2, seed=1)
    record = train(config, trunk=tiny_trunk())
    return config, record
