#!/usr/bin/env python3
"""Classify the test images on the compiled model (OpenVINO IR), with timings.

  python inception_test.py                      # model/test/positive.png and negative.png
  python inception_test.py a.png some/folder/   # any files, or every image under folders

Needs no TensorFlow when the IR is there (the Keras fallback does). Prints the 2018 article's lines
(`-- Loaded Test Image`, `-- STARTED`, `-- ENDED`, `-- TIME`, `TASS Identified IDC ...`, the top-2
classes, `-- TESTED`, `-- TIME(secs)`), then a summary. With IoTJumpWay.enabled it publishes every
result as its own device, IoTJumpWay.Tester (never as the edge server).
"""

from __future__ import annotations

import time

from idc.core import cli
from idc.core.bundle import PRECISIONS


def main() -> int:
    p = cli.parser(__doc__.strip().splitlines()[0])
    p.add_argument("images", nargs="*", help="image files or folders (default: model/test/*.png)")
    p.add_argument("--precision", type=str.upper, choices=PRECISIONS, help="IR to use (default: OpenVINO.precision; auto: INT8 on a CPU where compiled, else FP16)")
    p.add_argument("--device", help="OpenVINO device (default: OpenVINO.device)")
    p.add_argument("--keras", action="store_true", help="use the TensorFlow model instead of the IR")
    cli.add_decision_rule_options(p)
    args = p.parse_args()
    config = cli.setup(args)
    if args.device:
        from idc.core.config import with_overrides

        config = with_overrides(config, "OpenVINO", device=args.device)
    from idc.core.errors import ImageError
    from idc.core.files import find_images
    from idc.edge import console
    from idc.edge.engine import load_classifier
    from idc.iot.publisher import ResultPublisher

    classifier = load_classifier(config, "keras" if args.keras else args.precision, args.threshold, args.review_band)
    described = classifier.describe()
    print(f"-- Model: {described}")
    images = find_images(args.images or sorted((config.model_dir / "test").glob("*.png")))
    if not images:
        print(f"error: no images to classify in {args.images or config.model_dir / 'test'}")
        return 2
    device = described.get("device", classifier.backend)
    counts = {"IDC": 0, "no IDC": 0, "needs review": 0, "unreadable": 0}
    acknowledged: list[str] = []  # channels of the messages the broker acknowledged, in order
    started = time.perf_counter()
    # Its own device (IoTJumpWay.Tester): it never speaks for the edge server nor touches its Status.
    with ResultPublisher(config, device=config.mqtt.Tester,
                         on_published=lambda mid, channel: acknowledged.append(channel)) as publisher:
        if publisher.enabled:
            publisher.connection.wait_connected(5.0)
        for path in images:
            console.say(f"-- Loaded Test Image {path}", "", console.started(), "")
            try:
                prediction = classifier.classify(path)
            except ImageError as err:
                counts["unreadable"] += 1
                console.say(f"!! Could not read {path}: {err}", "")
                continue
            console.say(console.ended(), f"-- TIME: {prediction.seconds}", "", *console.identified(prediction))
            counts["IDC" if prediction.label else "no IDC"] += 1
            counts["needs review"] += prediction.needs_review
            publisher.publish_result(prediction.label, prediction.p_idc, prediction.needs_review)
            channels = []
            if publisher.enabled and publisher.connection.connected and publisher.flush(timeout=5.0):
                channels, acknowledged[:] = list(acknowledged), []
            # The article prints the Sensors line after the TASS line (IDC); anything else after the top-2.
            if prediction.label and "Sensors" in channels:
                channels.remove("Sensors")
                console.say("-- Published to Device Sensors Channel", "")
            console.say(*console.top2(prediction, device), *console.review_note(prediction),
                        *(f"-- Published to Device {channel} Channel" for channel in channels), "")
        if publisher.enabled and not publisher.flush(timeout=5.0):
            print(f"warning: MQTT broker {config.mqtt.host}:{config.mqtt.port} unreachable; results not published")
    total = time.perf_counter() - started
    console.say(console.ended(), f"-- TESTED:  {len(images)}", f"-- TIME(secs): {total}")
    print(f"-- Tested {len(images)} images in {total:.3f} seconds ({total / len(images):.4f} s/image): "
          + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 1 if counts["unreadable"] else 0


if __name__ == "__main__":
    cli.run(main)
