#!/usr/bin/env python3
"""Classify the test images on the compiled model (OpenVINO IR), with timings.

  python inception_test.py                      # model/test/positive.png and negative.png
  python inception_test.py a.png some/folder/   # any files, or every image under folders
  python inception_test.py --slide scan.svs     # whole slides: tiles, heatmap, GeoJSON (docs/slides.md)

Needs no TensorFlow when the IR is there (the Keras fallback does). Prints the 2018 article's lines
(`-- Loaded Test Image`, `-- STARTED`, `-- ENDED`, `-- TIME`, `TASS Identified IDC ...`, the top-2
classes, `-- TESTED`, `-- TIME(secs)`), then a summary. With IoTJumpWay.enabled it publishes every
result as its own device, IoTJumpWay.Tester (never as the edge server).

With --slide, each slide (any format OpenSlide reads) is tiled at the model's scale, its tissue
classified, and its outputs written to model/slides/<name>/ (Slides.output_dir), with a summary line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from idc.core import cli
from idc.core.bundle import PRECISIONS
from idc.core.context import describe_rule


def main() -> int:
    p = cli.parser(__doc__.strip().splitlines()[0])
    p.add_argument("images", nargs="*", help="image files or folders (default: model/test/*.png)")
    p.add_argument("--precision", type=str.upper, choices=PRECISIONS, help="IR to use (default: OpenVINO.precision; auto: INT8 on a CPU where compiled, else FP16)")
    p.add_argument("--device", help="OpenVINO device (default: OpenVINO.device)")
    p.add_argument("--keras", action="store_true", help="use the TensorFlow model instead of the IR")
    cli.add_decision_rule_options(p)
    slides = p.add_argument_group("whole slides")
    slides.add_argument("--slide", action="append", metavar="FILE", default=[],
                        help="classify this whole-slide image (.svs, .ndpi, tiled .tif, ...); repeatable")
    slides.add_argument("--mpp", type=float, help="level-0 microns per pixel of slides that do not say "
                        "(default: Slides.default_mpp)")
    slides.add_argument("--grid-origin", type=_point, default=(0, 0), metavar="X,Y",
                        help="level-0 pixel where the tile grid starts (default: 0,0)")
    slides.add_argument("--min-tissue", type=float, help="share of a tile that must be tissue (default: "
                        "Slides.min_tissue)")
    slides.add_argument("--out", help="output folder of a single --slide (default: Slides.output_dir/<name>)")
    args = p.parse_args()
    config = cli.setup(args)
    from idc.core.config import with_overrides

    if args.device:
        config = with_overrides(config, "OpenVINO", device=args.device)
    if args.min_tissue is not None:
        config = with_overrides(config, "Slides", min_tissue=args.min_tissue)
    if args.slide:
        if args.images:
            p.error("give images or --slide, not both")
        if args.out and len(args.slide) > 1:
            p.error("--out takes one --slide; several go to Slides.output_dir")
        return classify_slides(config, args)
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


def _point(text: str) -> tuple[int, int]:
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not X,Y in level-0 pixels (e.g. 0,0)") from None
    if x < 0 or y < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: X and Y must not be negative")
    return x, y


def classify_slides(config, args) -> int:
    """Each --slide through the engine, with a progress bar; a bad slide is reported and skipped."""
    from tqdm import tqdm

    from idc.core.errors import SlideError
    from idc.edge.engine import load_classifier
    from idc.slides.job import process_slide

    classifier = load_classifier(config, "keras" if args.keras else args.precision, args.threshold, args.review_band)
    print(f"-- Model: {classifier.describe()}")
    failed = 0
    for path in args.slide:
        bar = None

        def progress(done, total):
            nonlocal bar
            bar = bar or tqdm(desc=Path(path).name, total=total, unit="tile", leave=False)
            bar.update(done - bar.n)

        try:
            report, _, folder = process_slide(config, classifier, path, args.out, args.mpp, args.grid_origin,
                                              progress)
        except SlideError as err:
            failed += 1
            print(f"!! {err}")
            continue
        finally:
            if bar is not None:
                bar.close()
        print(slide_lines(report, folder))
    return 1 if failed else 0


def slide_lines(report: dict, folder) -> str:
    slide, rule, alone = report["slide"], report["rule"], report["patch_alone"]
    answer = (f"with slide context ({describe_rule(rule['context'])}) at threshold {rule['threshold']}"
              if rule["context"] else f"at threshold {rule['threshold']}")
    return "\n".join([
        f"-- Slide {slide['file']}: {slide['width']} x {slide['height']} px at {slide['mpp']:g} um/px "
        f"({'from the slide' if slide['mpp_source'] == 'slide' else 'given'}), read at level {slide['read_level']} "
        f"({slide['read_level_mpp']:g} um/px): {slide['columns']} x {slide['rows']} tiles of {slide['tile_microns']:g} um",
        f"-- Tissue: {report['tiles']['classified']} tiles classified, {report['tissue']['area_mm2']:.2f} mm2",
        f"-- IDC {answer}: {report['idc_tiles']} tiles, {report['idc_area_mm2']:.2f} mm2, "
        f"{100 * report['idc_share']:.1f} % of the tissue tiles; {report['tiles_to_review']} tiles to review",
        f"-- Patch alone at threshold {rule['threshold_alone']}: {alone['idc_tiles']} IDC tiles "
        f"({100 * alone['idc_share']:.1f} %), {alone['tiles_to_review']} to review",
        f"-- {report['tiles']['classified']} tiles in {report['seconds']['total']:.1f} s "
        f"({report['tiles_per_second']:.1f} tiles/s classified); outputs in {folder}",
    ])


if __name__ == "__main__":
    cli.run(main)
