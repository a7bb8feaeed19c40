"""Whole slides of a real test patient (../shared/data/slides: patient 8867 rebuilt as an Aperio .svs
at 4 um/px, and upsampled to 0.5 um/px with 4 levels), classified by a model trained on real patches
(the `real_project` fixture), against the same engine on the patient's own patch files. Skipped with
the reason where ../shared is absent."""

import csv

import numpy as np
import pytest

from idc.core import metrics
from idc.core.preprocessing import decode_image
from idc.edge.engine import load_classifier
from idc.slides.analysis import analyse_slide
from idc.slides.reader import SlideReader
from tests.paths import SHARED, SHARED_DATA, require_shared

pytestmark = pytest.mark.slow
SLIDES = SHARED / "data" / "slides"
PATIENT = "8867"
# The dataset's patches lie on a 50 px grid starting at 1 (x1, y1, x51, ...): 8 px at 0.5 um/px.
SCALES = {"mpp4": 1, "mpp0.5": 8}


@pytest.fixture(scope="module")
def engine(real_project):
    config, _, _ = real_project
    return load_classifier(config, "keras")


@pytest.fixture(scope="module")
def slides(engine):
    results = {}
    for scale, origin in SCALES.items():
        path = require_shared(SLIDES / scale / f"{PATIENT}.svs")
        labels = list(csv.DictReader((SLIDES / scale / f"{PATIENT}.labels.csv").open()))
        with SlideReader(path, engine.bundle.microns_per_pixel, engine.bundle.patch_pixels, origin=(origin, origin)) as reader:
            results[scale] = (analyse_slide(reader, engine), labels, reader.tile_size)
    return results


def cells(result):
    return {(t.column, t.row) for t in result.tiles}


def test_both_scans_give_the_same_tiles(slides):
    (coarse, _, _), (fine, _, _) = slides["mpp4"], slides["mpp0.5"]
    assert coarse.slide["columns"] == fine.slide["columns"] and coarse.slide["rows"] == fine.slide["rows"]
    assert fine.slide["read_level"] == 1 and fine.slide["read_level_mpp"] == 2.0  # not level 0: 16x fewer pixels
    a, b = cells(coarse), cells(fine)
    assert len(a ^ b) <= 0.01 * len(a | b), f"{len(a ^ b)} tiles differ of {len(a | b)}"
    p_coarse = dict(zip([(t.column, t.row) for t in coarse.tiles], coarse.p_alone))
    p_fine = dict(zip([(t.column, t.row) for t in fine.tiles], fine.p_alone))
    both = sorted(a & b)
    difference = np.abs(np.array([p_coarse[c] for c in both]) - np.array([p_fine[c] for c in both]))
    print(f"P(IDC) 4 vs 0.5 um/px: mean |difference| {difference.mean():.4f}, max {difference.max():.4f}")
    assert difference.mean() < 0.1


def test_no_tile_is_classified_on_glass_and_tissue_is_covered(slides):
    for scale, (result, labels, size) in slides.items():
        pasted = [(int(r["x"]), int(r["y"]), int(r["x"]) + int(r["width"]), int(r["y"]) + int(r["height"]))
                  for r in labels]
        boxes = np.array(pasted)
        for tile in result.tiles:  # every classified tile overlaps a pasted patch: none lies on glass alone
            overlap = ((np.minimum(boxes[:, 2], tile.x + tile.size) > np.maximum(boxes[:, 0], tile.x))
                       & (np.minimum(boxes[:, 3], tile.y + tile.size) > np.maximum(boxes[:, 1], tile.y)))
            assert overlap.any(), (scale, tile)
        placed = {(t.x, t.y) for t in result.tiles}
        covered = sum((int(r["x"]), int(r["y"])) in placed for r in labels)
        print(f"{scale}: {covered} of {len(labels)} labelled patches are tissue tiles")
        assert covered >= 0.9 * len(labels)  # the rest: mostly empty fat and glass at the tissue's edge


def test_slide_tiles_agree_with_the_engine_on_the_patients_patches(slides, engine):
    """Same model, same rule, on the tiles that cover the labelled patches and on the patch files."""
    files = {p.name: p for p in require_shared(SHARED_DATA / PATIENT).rglob("*.png")}
    for scale, (result, labels, _) in slides.items():
        position = {(t.x, t.y): i for i, t in enumerate(result.tiles)}
        covered = [(r, position[int(r["x"]), int(r["y"])]) for r in labels if (int(r["x"]), int(r["y"])) in position]
        patches = [decode_image(files[r["file"]]) for r, _ in covered]
        p_patch = np.concatenate([engine.probabilities(patches[i:i + 64]) for i in range(0, len(patches), 64)])
        p_tile = result.p_alone[[i for _, i in covered]]
        y = np.array([int(r["label"]) for r, _ in covered])
        tile_ba = metrics.classification_metrics(y, p_tile, engine.threshold)["balanced_accuracy"]
        patch_ba = metrics.classification_metrics(y, p_patch, engine.threshold)["balanced_accuracy"]
        print(f"{scale}: balanced accuracy tiles {tile_ba:.4f}, patches {patch_ba:.4f}; mean |P(IDC) tile - patch| "
              f"{np.abs(p_tile - p_patch).mean():.4f}")
        assert abs(tile_ba - patch_ba) <= 0.05, scale
