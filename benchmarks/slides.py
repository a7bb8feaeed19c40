#!/usr/bin/env python3
"""Whole-slide throughput and memory: tiles per second end to end (read + tissue + classify) on
one slide, as a ratio of the engine's own batch throughput measured in the same run on tiles
already in memory, the peak resident memory, and the projected time of a typical resection slide.
With --labels (the slide's CSV of true labels, as in ../shared/data/slides), also how the slide's
tiles agree with the engine on the dataset's patches of that patient (--patches): patch alone, and
with the bundle's slide context (the slide's own grid against the patches' positions, as evaluate.py
applies it).

  python benchmarks/slides.py                                  # ../shared/data/slides/mpp0.5/8867.svs
  python benchmarks/slides.py --slide scan.svs --precision FP16
  python benchmarks/slides.py --labels ../shared/data/slides/mpp0.5/8867.labels.csv \\
      --patches ../shared/data/idc-patches/8867 --grid-origin 8,8

The slides of ../shared are test patients: benchmark and check on them, never choose settings.
"""

from __future__ import annotations

import argparse
import csv
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED_SLIDE = ROOT.parent / "shared" / "data" / "slides" / "mpp0.5" / "8867.svs"
RESECTION_TILES = 100_000  # tissue tiles of 200 um (0.04 mm2 each): a typical resection slide, 4,000 mm2


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def labelled_patches(labels_csv: Path, patches: Path) -> list[tuple[Path, int, int, int]]:
    """(patch file, x, y, label) of each row of a slide's labels CSV, the files found under `patches`."""
    files = {p.name: p for p in patches.rglob("*.png")}
    return [(files[r["file"]], int(r["x"]), int(r["y"]), int(r["label"])) for r in csv.DictReader(labels_csv.open())]


def probabilities(engine, paths: list[Path]) -> np.ndarray:
    from idc.core.preprocessing import decode_image

    return np.concatenate([engine.probabilities([decode_image(p) for p in paths[i:i + 64]])
                           for i in range(0, len(paths), 64)])


def with_context(rule: dict, paths: list[Path], p_patches: np.ndarray) -> np.ndarray:
    """The patch files' P(IDC) with the bundle's slide-context `rule` applied over them, as evaluate.py
    applies it: each patch's neighbours are the patches beside it, positions from the dataset's file names."""
    from idc.core.bundle import parse_patch_name
    from idc.core.context import apply_rule

    patches = [parse_patch_name(Path(path)) for path in paths]
    return apply_rule(rule, [x.patient for x in patches], [x.x for x in patches], [x.y for x in patches], p_patches)


def tiles_and_patches(result, patches: list[tuple[Path, int, int, int]], p_patches: np.ndarray,
                      context: bool = False) -> tuple[np.ndarray, ...]:
    """Labels, the tiles' P(IDC) and the patch files' P(IDC) (`p_patches`, one per patch) of the labelled
    patches that are tissue tiles of the slide (the tile whose corner is the patch's): patch alone, or
    with `context` the slide's answer (the bundle's rule on its grid; `p_patches` then from with_context)."""
    by_position = {(t.x, t.y): i for i, t in enumerate(result.tiles)}
    covered = [(k, by_position[x, y]) for k, (_, x, y, _) in enumerate(patches) if (x, y) in by_position]
    rows, tiles = [k for k, _ in covered], [i for _, i in covered]
    p_tiles = result.p_idc if context else result.p_alone
    return np.array([patches[k][3] for k in rows], dtype=int), p_tiles[tiles], p_patches[rows]


def compare(y: np.ndarray, p_tile: np.ndarray, p_patch: np.ndarray, threshold: float) -> dict:
    from idc.core import metrics

    return {"covered": len(y), "mean_abs_p_difference": float(np.abs(p_tile - p_patch).mean()),
            "mean_p_difference": float((p_tile - p_patch).mean()),
            "decisions_differ": int(((p_tile >= threshold) != (p_patch >= threshold)).sum()),
            "balanced_accuracy_tiles": metrics.classification_metrics(y, p_tile, threshold)["balanced_accuracy"],
            "balanced_accuracy_patches_same": metrics.classification_metrics(y, p_patch, threshold)["balanced_accuracy"]}


def agreement(result, labels_csv: Path, patches: Path, engine) -> dict:
    """The slide's tiles at the labelled positions against the engine on the patient's patch files, patch
    alone and (under "context", when the bundle has a rule) with the bundle's slide context."""
    from idc.core import metrics

    labelled = labelled_patches(labels_csv, patches)
    labels = np.array([label for *_, label in labelled])
    p_every = probabilities(engine, [path for path, *_ in labelled])  # each patch file classified once
    found = compare(*tiles_and_patches(result, labelled, p_every), result.threshold_alone)
    found["labelled"] = len(labelled)
    found["balanced_accuracy_all_patches"] = metrics.classification_metrics(
        labels, p_every, result.threshold_alone)["balanced_accuracy"]
    if result.context is not None:
        p_context = with_context(engine.bundle.slide_context, [path for path, *_ in labelled], p_every)
        found["context"] = compare(*tiles_and_patches(result, labelled, p_context, context=True), result.threshold)
        found["context"]["balanced_accuracy_all_patches"] = metrics.classification_metrics(
            labels, p_context, result.threshold)["balanced_accuracy"]
    return found


def describe(found: dict) -> str:
    """One agreement's figures, for a line of output."""
    return (f"mean |P(IDC) tile - patch| {found['mean_abs_p_difference']:.4f} (mean {found['mean_p_difference']:+.4f}), "
            f"{found['decisions_differ']} decisions differ; balanced accuracy: tiles "
            f"{found['balanced_accuracy_tiles']:.4f}, the same patches {found['balanced_accuracy_patches_same']:.4f}, "
            f"every patch {found['balanced_accuracy_all_patches']:.4f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "confs.json"))
    p.add_argument("--slide", default=str(SHARED_SLIDE), help="the slide (default: %(default)s)")
    p.add_argument("--precision", type=str.upper, choices=["FP32", "FP16", "INT8", "KERAS"],
                   help="engine (default: OpenVINO.precision, auto: INT8 on a CPU)")
    p.add_argument("--grid-origin", default="0,0", help="level-0 X,Y of the tile grid (default: %(default)s)")
    p.add_argument("--mpp", type=float, help="level-0 um per pixel if the slide does not say")
    p.add_argument("--labels", help="the slide's labels CSV (patient,file,x,y,width,height,label)")
    p.add_argument("--patches", help="the folder of that patient's patches (with --labels)")
    args = p.parse_args()
    if not Path(args.slide).exists():
        print(f"error: no slide at {args.slide}", file=sys.stderr)
        return 2
    from idc.core.config import load_config
    from idc.core.context import describe_rule
    from idc.edge.engine import load_classifier
    from idc.slides.analysis import analyse_slide, tissue_tiles
    from idc.slides.reader import SlideReader

    config = load_config(args.config)
    settings = config.Slides
    precision = args.precision.replace("KERAS", "keras") if args.precision else None
    engine = load_classifier(config, precision)
    bundle = engine.bundle
    origin = tuple(int(v) for v in args.grid_origin.split(","))
    baseline_rss = peak_rss_mib()
    print(f"engine: {engine.backend} on {engine.describe().get('device')}; batch {settings.batch_size}")

    with SlideReader(args.slide, bundle.microns_per_pixel, bundle.patch_pixels, args.mpp, origin) as reader:
        described = reader.describe()
        print(f"slide: {described['file']} {described['width']} x {described['height']} px at {described['mpp']:g} "
              f"um/px, {described['levels']} levels, read at level {described['read_level']} "
              f"({described['read_level_mpp']:g} um/px)")
        # The engine alone: the same number of tiles, already read and in memory, the same batches.
        tiles, _, _ = tissue_tiles(reader, settings.min_tissue)
        sample = reader.read(tiles[: settings.batch_size * 4])
        engine.probabilities(sample[: settings.batch_size])  # warm
        started = time.perf_counter()
        for start in range(0, len(tiles), settings.batch_size):
            count = min(settings.batch_size, len(tiles) - start)
            engine.probabilities([sample[(start + i) % len(sample)] for i in range(count)])
        engine_rate = len(tiles) / (time.perf_counter() - started)
        engine_rss = peak_rss_mib()
        started = time.perf_counter()
        result = analyse_slide(reader, engine, settings.min_tissue, settings.batch_size)
        end_to_end = time.perf_counter() - started
    rate = len(result.tiles) / end_to_end
    peak = peak_rss_mib()
    print(f"tissue tiles: {len(result.tiles)} of {described['columns'] * described['rows']} "
          f"(tissue detection {result.seconds['tissue']:.2f} s)")
    print(f"engine alone (tiles in memory): {engine_rate:.1f} tiles/s")
    print(f"end to end (read + tissue + classify): {rate:.1f} tiles/s in {end_to_end:.1f} s: "
          f"{rate / engine_rate:.2f} of the engine's throughput")
    print(f"peak RSS: {peak:.0f} MiB: the engine {baseline_rss:.0f} MiB loaded, {engine_rss:.0f} MiB after its "
          f"batches of {settings.batch_size}, {peak - engine_rss:+.0f} MiB for the slide")
    hours = RESECTION_TILES / rate / 3600
    print(f"projected: a resection slide of {RESECTION_TILES:,} tissue tiles (4,000 mm2) at this rate: "
          f"{hours:.2f} h ({RESECTION_TILES / rate / 60:.0f} min)")
    if args.labels:
        if not args.patches:
            p.error("--labels needs --patches")
        found = agreement(result, Path(args.labels), Path(args.patches), engine)
        print(f"agreement with the engine on the patient's patches: {found['covered']} of {found['labelled']} "
              f"labelled patches are tissue tiles")
        print(f"  patch alone (threshold {result.threshold_alone}): {describe(found)}")
        if "context" in found:
            print(f"  with the bundle's slide context ({describe_rule(result.context)}, threshold "
                  f"{result.threshold}): {describe(found['context'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
