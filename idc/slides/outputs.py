"""What a slide's analysis leaves in its folder (one per slide):

- `tiles.csv`: every classified tile: x, y, width, height (level-0 px), tissue share, the slide's
  answer (P(IDC), IDC 0/1, needs review: with slide context where the bundle has a rule) and the
  patch-alone answer beside it.
- `heatmap.png`: the slide's thumbnail with P(IDC) over its tissue tiles; `overlay.png`: the same
  colours, one pixel per tile and transparent elsewhere, for the deep-zoom viewer.
- `tiles.geojson`: every tile as a QuPath tile object (class IDC / no IDC with its colour, P(IDC) as
  measurements); `regions.geojson`: the IDC tiles merged into regions (QuPath annotations, with
  their area), both in level-0 pixels, as QuPath, TIAToolbox and WSInfer exchange them.
- `summary.json`: tiles, tissue area, IDC area (mm2) and share, tiles to review, the rule applied,
  the model, timings.

Everything is written to a sibling folder first and moved into place at the end, so a stopped or
failed run never leaves half a result, and a rerun replaces the old one whole.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from idc.slides.analysis import SlideResult

TILE_FIELDS = ("x", "y", "width", "height", "tissue", "p_idc", "idc", "needs_review",
               "p_idc_alone", "idc_alone", "needs_review_alone")
CLASS_COLOURS = {"IDC": (200, 0, 0), "no IDC": (0, 90, 200)}  # QuPath takes [r, g, b]
# P(IDC) 0 -> blue, 0.5 -> pale yellow, 1 -> red (a diverging ramp, ColorBrewer's RdYlBu reversed)
RAMP = np.array([(49, 54, 149), (116, 173, 209), (255, 255, 191), (244, 109, 67), (165, 0, 38)], dtype=float)
HEATMAP_ALPHA = 0.55
MAX_HEATMAP_SIDE = 2048
FILES = {"tiles": "tiles.csv", "heatmap": "heatmap.png", "overlay": "overlay.png", "tiles_geojson": "tiles.geojson",
         "regions_geojson": "regions.geojson", "summary": "summary.json"}


def colours(p: np.ndarray) -> np.ndarray:
    """RGB uint8 of each P(IDC) on RAMP."""
    stops = np.linspace(0.0, 1.0, len(RAMP))
    return np.stack([np.interp(p, stops, RAMP[:, channel]) for channel in range(3)], axis=-1).astype(np.uint8)


def overlay(result: SlideResult) -> Image.Image:
    """RGBA, one pixel per grid cell: the P(IDC) colour on tissue tiles, transparent elsewhere."""
    slide = result.slide
    pixels = np.zeros((slide["rows"], slide["columns"], 4), dtype=np.uint8)
    rows = np.array([t.row for t in result.tiles])
    columns = np.array([t.column for t in result.tiles])
    pixels[rows, columns, :3] = colours(result.p_idc)
    pixels[rows, columns, 3] = 255
    return Image.fromarray(pixels, "RGBA")


def heatmap(result: SlideResult, grid: Image.Image) -> Image.Image:
    """The thumbnail with the overlay blended over it."""
    background = result.tissue_mask.image
    scale = result.tissue_mask.scale  # level-0 px per thumbnail px
    slide = result.slide
    size = (round(slide["columns"] * slide["tile_size"] / scale), round(slide["rows"] * slide["tile_size"] / scale))
    layer = Image.new("RGBA", background.size, (0, 0, 0, 0))
    layer.paste(grid.resize(size, Image.NEAREST),
                (round(slide["origin"][0] / scale), round(slide["origin"][1] / scale)))
    alpha = np.asarray(layer.getchannel("A"), dtype=float) * HEATMAP_ALPHA
    layer.putalpha(Image.fromarray(alpha.astype(np.uint8)))
    out = Image.alpha_composite(background.convert("RGBA"), layer).convert("RGB")
    if max(out.size) > MAX_HEATMAP_SIDE:
        out.thumbnail((MAX_HEATMAP_SIDE, MAX_HEATMAP_SIDE), Image.LANCZOS)
    return out


def _square(tile) -> list[list[list[int]]]:
    x0, y0, x1, y1 = tile.x, tile.y, tile.x + tile.size, tile.y + tile.size
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


def _class(idc: int) -> dict:
    name = "IDC" if idc else "no IDC"
    return {"name": name, "color": list(CLASS_COLOURS[name])}


def tiles_geojson(result: SlideResult) -> dict:
    """Every classified tile as a QuPath tile object (objectType "tile")."""
    features = []
    for tile, p, idc, review, p_alone, tissue in zip(result.tiles, result.p_idc, result.idc, result.needs_review,
                                                    result.p_alone, result.tissue):
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": _square(tile)},
                         "properties": {"objectType": "tile", "classification": _class(int(idc)),
                                        "isLocked": True, "needsReview": bool(review),
                                        "measurements": {"P(IDC)": round(float(p), 6),
                                                         "P(IDC) patch alone": round(float(p_alone), 6),
                                                         "Tissue share": round(float(tissue), 4)}}})
    return {"type": "FeatureCollection", "features": features}


def regions_geojson(result: SlideResult) -> dict:
    """The IDC tiles merged into regions (touching tiles join): QuPath annotations with their area."""
    from shapely.geometry import box, mapping
    from shapely.ops import unary_union

    mm2_per_px = (result.slide["mpp"] / 1000) ** 2
    squares = [box(t.x, t.y, t.x + t.size, t.y + t.size) for t, idc in zip(result.tiles, result.idc) if idc]
    merged = unary_union(squares) if squares else None
    polygons = [] if merged is None else list(getattr(merged, "geoms", [merged]))
    polygons.sort(key=lambda polygon: -polygon.area)
    features = [{"type": "Feature", "geometry": mapping(polygon),
                 "properties": {"objectType": "annotation", "name": f"IDC region {index}",
                                "classification": _class(1), "isLocked": False,
                                "measurements": {"Area mm2": round(polygon.area * mm2_per_px, 4)}}}
                for index, polygon in enumerate(polygons, 1)]
    return {"type": "FeatureCollection", "features": features}


def summary(result: SlideResult) -> dict:
    slide = result.slide
    tile_mm2 = (slide["tile_microns"] / 1000) ** 2
    mask_mm2 = (result.tissue_mask.scale * slide["mpp"] / 1000) ** 2
    tissue_mm2 = float(result.tissue_mask.mask.sum()) * mask_mm2
    n = len(result.tiles)

    def counts(idc: np.ndarray, review: np.ndarray) -> dict:
        return {"idc_tiles": int(idc.sum()), "idc_area_mm2": round(float(idc.sum()) * tile_mm2, 3),
                "idc_share": round(float(idc.mean()), 4) if n else 0.0, "tiles_to_review": int(review.sum())}

    classify = result.seconds.get("classify") or float("nan")
    return {
        "slide": slide,
        "rule": {"answer": "slide context" if result.context else "patch alone", "threshold": result.threshold,
                 "review_band": result.review_band, "threshold_alone": result.threshold_alone,
                 "context": result.context},
        "tiles": {"grid": slide["columns"] * slide["rows"], "classified": n,
                  "tile_area_mm2": round(tile_mm2, 6)},
        "tissue": {"area_mm2": round(tissue_mm2, 3), "saturation_threshold": result.tissue_mask.threshold},
        **counts(result.idc, result.needs_review),
        "patch_alone": counts(result.idc_alone, result.needs_review_alone),
        "model": result.model,
        "seconds": result.seconds,
        "tiles_per_second": round(n / classify, 2) if n else 0.0,
        "files": FILES,
    }


def write_outputs(result: SlideResult, folder: str | Path) -> dict:
    """Write every output into `folder` (replacing an older result whole); returns the summary."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with (partial / FILES["tiles"]).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TILE_FIELDS)
        for row in zip(result.tiles, result.tissue, result.p_idc, result.idc, result.needs_review,
                       result.p_alone, result.idc_alone, result.needs_review_alone):
            tile, tissue, p, idc, review, p_alone, idc_alone, review_alone = row
            writer.writerow((tile.x, tile.y, tile.size, tile.size, round(float(tissue), 4), round(float(p), 6),
                             int(idc), int(review), round(float(p_alone), 6), int(idc_alone), int(review_alone)))
    grid = overlay(result)
    grid.save(partial / FILES["overlay"])
    heatmap(result, grid).save(partial / FILES["heatmap"])
    for key, make in (("tiles_geojson", tiles_geojson), ("regions_geojson", regions_geojson)):
        (partial / FILES[key]).write_text(json.dumps(make(result)))
    report = summary(result)
    (partial / FILES["summary"]).write_text(json.dumps(report, indent=2) + "\n")
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        partial.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(folder)
    return report
