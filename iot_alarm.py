#!/usr/bin/env python3
"""The Raspberry Pi alarm: subscribes to the edge servers' results over MQTT and drives a red LED,
a blue LED and a buzzer through gpiozero (pins and topics from confs.json, section Alarm).

  python iot_alarm.py               # on a Raspberry Pi
  python iot_alarm.py --mock        # anywhere: simulated pins, every pin change logged
                                    # (GPIOZERO_PIN_FACTORY=mock does the same)

IDC: red LED + buzzer for Alarm.buzzer_seconds; no IDC: blue LED; needs review: red LED blinking.
{"Command": "ACK"} on the alarm's Commands topic (or the optional button) silences the buzzer.
Its MQTT session is persistent: results published while it was off arrive when it starts; one older
than IoTJumpWay.stale_after_seconds lights the LEDs without the buzzer.
Stops cleanly (Status OFFLINE) on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from idc.core import cli


def main() -> int:
    p = cli.parser(__doc__.strip().splitlines()[0])
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    p.add_argument("--mock", action="store_true", help="simulate the GPIO pins and log every change")
    args = p.parse_args()
    config = cli.setup(args)
    log = logging.getLogger("iot_alarm")

    from gpiozero.exc import BadPinFactory

    from idc.iot.alarm import Alarm, mock_pin_factory

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
    cli.run(main)
