#!/usr/bin/env python3
"""Classify the test images on the compiled model (OpenVINO IR), with timings.

  python inception_test.py                      # model/test/positive.png and negative.png
  python inception_test.py a.png some/folder/   # any files, or every image under folders

Needs no TensorFlow when the IR is there (the Keras fallback does).
"""

from __future__ import annotations

import time
from datetime import datetime

from idc.core import cli
from idc.core.bundle import PRECISIONS


def main() -> int:
    p = cli.parser(__doc__.strip().splitlines()[0])
    p.add_argument("images", nargs="*", help="image files or folders (default: model/test/*.png)")
    p.add_argument("--precision", type=str.upper, choices=PRECISIONS, help="IR to use (default: OpenVINO.precision)")
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
    from idc.edge.engine import load_classifier
    from idc.iot.mqtt import ResultPublisher

    classifier = load_classifier(config, "keras" if args.keras else args.precision, args.threshold, args.review_band)
    print(f"-- Model: {classifier.describe()}")
    images = find_images(args.images or sorted((config.model_dir / "test").glob("*.png")))
    if not images:
        print(f"error: no images to classify in {args.images or config.model_dir / 'test'}")
        return 2
    counts = {"IDC": 0, "no IDC": 0, "needs review": 0, "unreadable": 0}
    started = time.perf_counter()
    with ResultPublisher(config) as publisher:  # does nothing unless IoTJumpWay.enabled
        for path in images:
            print(f"-- Loaded Test Image {path}")
            print(f"-- Inference started {datetime.now().isoformat(timespec='milliseconds')}")
            try:
                prediction = classifier.classify(path)
            except ImageError as err:
                counts["unreadable"] += 1
                print(f"!! Could not read {path}: {err}")
                continue
            print(f"-- Inference ended {datetime.now().isoformat(timespec='milliseconds')} "
                  f"in {prediction.seconds:.4f} seconds")
            confidence = f"{prediction.p_idc:.3f}" if prediction.label else f"{1 - prediction.p_idc:.3f}"
            print(f"TASS Identified {'IDC' if prediction.label else 'no IDC'} with a confidence of {confidence}"
                  + ("  (needs human review)" if prediction.needs_review else ""))
            counts["IDC" if prediction.label else "no IDC"] += 1
            counts["needs review"] += prediction.needs_review
            publisher.publish_result(prediction.label, prediction.p_idc, prediction.needs_review)
        if publisher.enabled and not publisher.flush(timeout=5.0):
            print(f"warning: MQTT broker {config.mqtt.host}:{config.mqtt.port} unreachable; results not published")
    total = time.perf_counter() - started
    print(f"-- Tested {len(images)} images in {total:.3f} seconds ({total / len(images):.4f} s/image): "
          + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 1 if counts["unreadable"] else 0


if __name__ == "__main__":
    cli.run(main)
