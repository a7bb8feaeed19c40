#!/usr/bin/env python3
"""What the shipped broker persistence costs and buys: mosquitto's defaults against examples/mosquitto/idc.conf.

  .venv/bin/python benchmarks/broker_persistence.py                 # 1,000 results
  .venv/bin/python benchmarks/broker_persistence.py --results 5000

For each setting, a real mosquitto on 127.0.0.1 (a free port; needs Debian's mosquitto): an alarm's
persistent session is made and left (the Pi switched off), a server publishes `--results` QoS 1
results for it (each acknowledged by the broker), then the broker is killed (SIGKILL, a power cut)
and restarted, and the alarm comes back. Prints the publishing rate, its ratio to mosquitto's
defaults measured in the same run, the broker database's size, and how many results the returning
alarm got. Exit status 0 when the shipped setting delivered every result, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import PacketTypes, Properties

ROOT = Path(__file__).resolve().parent.parent
# The tests' broker harness (a file of the checkout, not of the package), loaded by its path.
_spec = importlib.util.spec_from_file_location("mosquitto_harness", ROOT / "tests" / "mosquitto.py")
_spec.loader.exec_module(harness := importlib.util.module_from_spec(_spec))
Mosquitto, wait_until = harness.Mosquitto, harness.wait_until

TOPIC = "IDC/Devices/Lab/EdgeServer/Sensors"


def client(broker: Mosquitto, client_id: str, on_message=None) -> paho.Client:
    """An MQTT 5 client with a persistent session (as the project's devices have), connected."""
    mqtt = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 86400
    connected = threading.Event()
    mqtt.on_connect = lambda *args: connected.set()
    if on_message:
        mqtt.on_message = on_message
    mqtt.connect(broker.host, broker.port, clean_start=False, properties=properties)
    mqtt.loop_start()
    if not connected.wait(5):
        raise RuntimeError(f"no connection to mosquitto on port {broker.port}")
    return mqtt


def run(folder: Path, autosave: bool, results: int) -> dict:
    broker = Mosquitto(folder, persistence=True, autosave=autosave)
    broker.start()
    try:
        alarm = client(broker, "bench-alarm")
        alarm.subscribe(TOPIC, qos=1)
        time.sleep(0.2)
        alarm.disconnect()
        alarm.loop_stop()
        server = client(broker, "bench-server")
        started = time.perf_counter()
        infos = [server.publish(TOPIC, f'{{"Results": 1, "N": {n}}}', qos=1) for n in range(results)]
        for info in infos:
            info.wait_for_publish(10)
        seconds = time.perf_counter() - started
        server.disconnect()
        server.loop_stop()
        database = folder / "mosquitto.db"
        size = database.stat().st_size if database.exists() else 0
        broker.crash()
        broker.start()
        got = []
        alarm = client(broker, "bench-alarm", on_message=lambda c, u, message: got.append(message.payload))
        wait_until(lambda: len(got) >= results, 10, 0.05)
        time.sleep(0.3)  # nothing more arrives
        alarm.disconnect()
        alarm.loop_stop()
        return {"rate": results / seconds, "database_bytes": size, "delivered": len(got)}
    finally:
        broker.stop()


def main(argv=None) -> int:
    summary, _, details = __doc__.strip().partition("\n")
    p = argparse.ArgumentParser(description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=int, default=1000, help="results published while the alarm is away "
                                                             "(default: 1000; mosquitto keeps at most 1000 a device)")
    args = p.parse_args(argv)
    if not 0 < args.results <= 100_000:
        p.error("--results must be in 1..100000")
    with tempfile.TemporaryDirectory() as tmp:
        default = run(Path(tmp) / "default", False, args.results)
        shipped = run(Path(tmp) / "shipped", True, args.results)
    print(f"{'broker persistence':<44} {'results/s':>10} {'ratio':>6} {'db bytes':>9} {'delivered after SIGKILL':>24}")
    for name, row in (("mosquitto's defaults (save every 30 min)", default),
                      ("shipped idc.conf (save after every change)", shipped)):
        print(f"{name:<44} {row['rate']:>10.0f} {row['rate'] / default['rate']:>6.2f} {row['database_bytes']:>9} "
              f"{row['delivered']:>14} of {args.results}")
    return 0 if shipped["delivered"] == args.results else 1


if __name__ == "__main__":
    sys.exit(main())
