#!/usr/bin/env python3
"""The Raspberry Pi alarm: subscribes to the edge servers' results over MQTT and drives a red LED,
a blue LED and a buzzer through gpiozero (pins and topics from confs.json, section Alarm).

Without a Pi, run it with --mock (or GPIOZERO_PIN_FACTORY=mock): pins are simulated and every
pin change is logged. Stops cleanly (Status OFFLINE) on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from gpiozero.exc import BadPinFactory

from idc.alarm import Alarm, mock_pin_factory
from idc.config import load_config
from idc.errors import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="path of confs.json (default: the project's own)")
    parser.add_argument("--mock", action="store_true", help="simulate the GPIO pins and log every change")
    parser.add_argument("--verbose", action="store_true", help="log MQTT details too")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("iot_alarm")
    try:
        config = load_config(args.config)
    except ConfigError as err:
        log.error("%s", err)
        return 2
    mock = args.mock or os.environ.get("GPIOZERO_PIN_FACTORY", "").lower() == "mock"
    if mock:
        log.info("GPIO pins simulated (gpiozero mock pin factory); every pin change is logged")
    try:
        alarm = Alarm(config, pin_factory=mock_pin_factory() if mock else None)
    except BadPinFactory as err:
        log.error("no GPIO pins available (%s): run on a Raspberry Pi, or pass --mock to simulate them", err)
        return 2

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    alarm.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        log.info("stopping")
        alarm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
