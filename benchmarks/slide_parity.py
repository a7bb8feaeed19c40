#!/usr/bin/env python3
"""Do a slide's tiles give what the patches give? Measured on patients one may choose settings on.

The slides of ../shared/data/slides are test patients': they may check the model, never choose it.
This rebuilds slides of the patients of one split of the sorted model folder (default: the
validation patients) the way those were made: each patient's patches pasted at their (x, y) on
glass, written as a tiled JPEG TIFF at quality 90 with 4:2:0 chroma (what the shared .svs hold, as
Aperio writes them) at the dataset's 4 um/px, then read through the slide path (tissue detection,
the grid from (1, 1), the engine in batches) and compared with the engine on the same patch files:
balanced accuracy of the tiles against that of the same patches at the bundle's threshold, pooled
over the patients and per patient, and how far P(IDC) moves: patch alone, and with the bundle's
slide context (on the slide's grid, and over the patches' positions as evaluate.py applies it).

  python benchmarks/slide_parity.py                       # validation patients, the served engine
  python benchmarks/slide_parity.py --precision KERAS     # the Keras model (evaluate.py's)
  python benchmarks/slide_parity.py --quality 70 --split train --patients 10
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from slides import compare, probabilities, tiles_and_patches, with_context  # benchmarks/slides.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
PATCH = 50  # px a side of the dataset's patches
MARGIN = 100  # glass right and below the last patch, as in the shared slides (x 3201 -> width 3301)
ORIGIN = (1, 1)  # the dataset's patches start at x = 1, y = 1


def patients_of(manifest: Path, split: str, limit: int | None) -> dict[str, list[tuple[Path, int, int, int]]]:
    """(patch file, x, y, label) of each patient of `split`, patients in name order, the first `limit`."""
    if not manifest.exists():
        raise SystemExit(f"error: no sorted split at {manifest}: run `python trainer.py sort` (or the main command) first")
    patients = defaultdict(list)
    for row in csv.DictReader(manifest.open()):
        if row["split"] == split:
            patients[row["patient"]].append((manifest.parent / row["file"], int(row["x"]), int(row["y"]),
                                             int(row["label"])))
    if not patients:
        raise SystemExit(f"error: no patients of split {split!r} in {manifest}")
    return dict(sorted(patients.items())[:limit])


def rebuild(patches: list[tuple[Path, int, int, int]], path: Path, quality: int, slides, scale: int) -> Path:
    """The slide at 4 um/px (`scale` 1: level 0 and one halving), or as the shared 0.5 um/px slide was made
    (`scale` 8: each patch enlarged 8 times, bicubic; levels reduced 4 times each)."""
    from PIL import Image

    from idc.core.preprocessing import decode_image

    size = (max(x for _, x, _, _ in patches) + PATCH + MARGIN, max(y for _, _, y, _ in patches) + PATCH + MARGIN)
    canvas = slides.paste([(decode_image(p), x, y) for p, x, y, _ in patches], size, scale, Image.BICUBIC)
    if scale == 1:
        return slides.write_slide(path, canvas, 4.0, levels=2, jpeg_quality=quality)
    return slides.write_slide(path, canvas, 4.0 / scale, levels=4, jpeg_quality=quality, downsample=4)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "confs.json"), help="the configuration (default: the checkout's confs.json)")
    p.add_argument("--split", default="validation", help="the manifest's split whose patients are rebuilt (default: %(default)s)")
    p.add_argument("--patients", type=int, help="only the first N patients of the split (default: all)")
    p.add_argument("--mpp", type=float, choices=[4.0, 0.5], default=4.0,
                   help="the slides' scale: 4 um/px, or 0.5 (each patch enlarged 8 times, bicubic, as the shared "
                        "0.5 um/px slide; large: use --patients) (default: %(default)s)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the slides' tiles (default: %(default)s)")
    p.add_argument("--precision", type=str.upper, choices=["FP32", "FP16", "INT8", "KERAS"],
                   help="engine (default: OpenVINO.precision, auto: INT8 on a CPU)")
    p.add_argument("--slides-dir", help="keep the rebuilt slides here, and read those already there (to compare models "
                                        "on the same slides) (default: a temporary folder)")
    args = p.parse_args()

    from idc.core.config import load_config
    from idc.edge.engine import load_classifier
    from idc.slides.analysis import analyse_slide
    from idc.slides.reader import SlideReader

    spec = importlib.util.spec_from_file_location("test_slides", ROOT / "tests" / "slides.py")  # the slide writer
    slides = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(slides)
    config = load_config(args.config)
    engine = load_classifier(config, args.precision.replace("KERAS", "keras") if args.precision else None)
    bundle, threshold = engine.bundle, engine.threshold
    patients = patients_of(config.model.manifest, args.split, args.patients)
    scale = round(4.0 / args.mpp)
    print(f"engine: {engine.backend}; {len(patients)} {args.split} patients rebuilt as JPEG quality {args.quality} "
          f"4:2:0 slides at {args.mpp:g} um/px; patch alone at threshold {threshold}"
          + (f", with slide context at {bundle.slide_context['threshold']}" if bundle.slide_context else ""))
    rule = bundle.slide_context
    pooled = {"alone": [], "context": []}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.slides_dir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for patient, patches in patients.items():
            path = folder / f"{patient}-{args.mpp:g}um-q{args.quality}.tiff"
            if not (args.slides_dir and path.exists()):
                rebuild(patches, path, args.quality, slides, scale)
            origin = (ORIGIN[0] * scale, ORIGIN[1] * scale)
            with SlideReader(path, bundle.microns_per_pixel, bundle.patch_pixels, origin=origin) as reader:
                result = analyse_slide(reader, engine, config.Slides.min_tissue, config.Slides.batch_size)
            if not args.slides_dir:
                path.unlink()  # a 0.5 um/px slide of a large patient holds gigabytes of pixels
            at_level_0 = [(p, x * scale, y * scale, label) for p, x, y, label in patches]
            p_patches = probabilities(engine, [p for p, *_ in patches])
            pooled["alone"].append(tiles_and_patches(result, at_level_0, p_patches))
            if rule:
                p_context = with_context(rule, [p for p, *_ in patches], p_patches)
                pooled["context"].append(tiles_and_patches(result, at_level_0, p_context, context=True))
            found = compare(*pooled["alone"][-1], threshold)
            print(f"{patient}: {found['covered']} of {len(patches)} patches are tissue tiles; mean P(IDC) tile - "
                  f"patch {found['mean_p_difference']:+.4f} (|.| {found['mean_abs_p_difference']:.4f}); "
                  f"{found['decisions_differ']} decisions differ"
                  + (f" ({compare(*pooled['context'][-1], rule['threshold'])['decisions_differ']} with context)"
                     if rule else ""))
    patches_in_all = sum(map(len, patients.values()))
    for name, parts in pooled.items():
        if not parts:
            continue
        y, p_tile, p_patch = (np.concatenate(part) for part in zip(*parts))
        found = compare(y, p_tile, p_patch, threshold if name == "alone" else rule["threshold"])
        print(f"pooled, {'patch alone' if name == 'alone' else 'with slide context'}: {found['covered']} tiles of "
              f"{patches_in_all} patches; mean P(IDC) tile - patch {found['mean_p_difference']:+.4f} "
              f"(|.| {found['mean_abs_p_difference']:.4f}); {found['decisions_differ']} decisions differ; balanced "
              f"accuracy: tiles {found['balanced_accuracy_tiles']:.4f}, the same patches "
              f"{found['balanced_accuracy_patches_same']:.4f}, gap "
              f"{found['balanced_accuracy_patches_same'] - found['balanced_accuracy_tiles']:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
