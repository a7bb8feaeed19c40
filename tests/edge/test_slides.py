"""Whole slides (idc.slides) on small real TIFF slides made here (tests/slides.py) and the tiny model:
reading at the model's scale, tissue detection, the outputs, bad input, the CLI."""

import copy
import csv
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from idc.core.context import GRID, with_context
from idc.core.errors import SlideError
from idc.slides.analysis import Stopped, analyse_slide
from idc.slides.job import process_slide, slide_id
from idc.slides.outputs import FILES, TILE_FIELDS
from idc.slides.reader import SlideReader
from tests.paths import ROOT
from tests.slides import GLASS, paste, write_slide
from tests.synthetic import patch_image, restained

MODEL_MPP, PATCH = 4.0, 50
# Where the tissue is, in tiles of the 4 um/px grid: an IDC block and a no-IDC block, glass elsewhere.
IDC_CELLS = [(c, r) for c in range(2, 5) for r in range(2, 4)]
BENIGN_CELLS = [(c, r) for c in range(6, 9) for r in range(2, 5)]
COLUMNS, ROWS = 12, 7


def patches(seed: int = 0) -> list[tuple[np.ndarray, int, int]]:
    rng = np.random.default_rng(seed)
    return [(np.asarray(patch_image(label, rng)), c * PATCH, r * PATCH)
            for label, cells in ((1, IDC_CELLS), (0, BENIGN_CELLS)) for c, r in cells]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """The same tissue as a 4 um/px slide and as a 0.5 um/px one (8x, nearest: lossless)."""
    folder = tmp_path_factory.mktemp("slides")
    size = (COLUMNS * PATCH, ROWS * PATCH)
    coarse = write_slide(folder / "coarse.tiff", paste(patches(), size), MODEL_MPP, levels=1)
    fine = write_slide(folder / "fine.tiff", paste(patches(), size, scale=8), MODEL_MPP / 8, levels=4)
    return {"coarse": coarse, "fine": fine, "folder": folder}


def tissue_cells(result):
    return {(t.column, t.row) for t in result.tiles}


def test_a_fine_scan_gives_the_same_tiles_as_one_at_the_models_scale(slides):
    with SlideReader(slides["coarse"], MODEL_MPP, PATCH) as coarse, SlideReader(slides["fine"], MODEL_MPP, PATCH) as fine:
        assert (coarse.columns, coarse.rows) == (fine.columns, fine.rows) == (COLUMNS, ROWS)
        assert coarse.tile_size == 50 and fine.tile_size == 400
        assert fine.level > 0  # read from the level nearest 4 um/px, not from level 0
        cells = IDC_CELLS + BENIGN_CELLS
        a = coarse.read([coarse.tile(c, r) for c, r in cells])
        b = fine.read([fine.tile(c, r) for c, r in cells])
    for (image, _, _), x, y in zip(patches(), a, b):
        assert x.shape == y.shape == (PATCH, PATCH, 3)
        assert np.abs(x.astype(int) - image).max() == 0  # lossless at the model's scale
        assert np.abs(y.astype(int) - image).mean() < 1.0  # resampled from a pyramid level


def test_a_scanners_jpeg_slide_gives_its_tiles_up_to_the_compression(slides):
    """As scanners store slides (and ../shared's hold them): JPEG tiles, YCbCr with 4:2:0 chroma."""
    import tifffile

    size = (COLUMNS * PATCH, ROWS * PATCH)
    path = write_slide(slides["folder"] / "jpeg.svs", paste(patches(), size), MODEL_MPP, levels=1, jpeg_quality=90)
    with SlideReader(path, MODEL_MPP, PATCH) as reader, SlideReader(slides["coarse"], MODEL_MPP, PATCH) as lossless:
        cells = IDC_CELLS + BENIGN_CELLS
        jpeg = reader.read([reader.tile(c, r) for c, r in cells])
        exact = lossless.read([lossless.tile(c, r) for c, r in cells])
    page = tifffile.TiffFile(path).pages[0]
    assert (page.compression, page.photometric, page.tags["YCbCrSubSampling"].value) == (7, 6, (2, 2))
    images = [image for image, _, _ in patches()]
    for index, (tile, same) in enumerate(zip(jpeg, exact)):
        assert tile.shape == (PATCH, PATCH, 3) and np.array_equal(same, images[index])
        difference = np.abs(tile.astype(int) - images[index]).mean()
        another = np.abs(tile.astype(int) - images[index - 1]).mean()
        assert 0 < difference < another  # lossy (noise-like synthetic patches compress worst), but its own patch


def test_glass_is_never_classified_and_every_tissue_tile_is(slides, tiny_classifier):
    for name in ("coarse", "fine"):
        with SlideReader(slides[name], MODEL_MPP, PATCH) as reader:
            result = analyse_slide(reader, tiny_classifier, min_tissue=0.1, batch_size=5)
        assert tissue_cells(result) == set(IDC_CELLS + BENIGN_CELLS), name
        assert result.tissue.min() >= 0.95  # the median filter rounds the tissue's corners


def test_slide_tiles_get_the_patch_engines_answer(slides, tiny_classifier):
    """Same model, same rule: a tile of the slide is classified as the patch it was cut from."""
    with SlideReader(slides["coarse"], MODEL_MPP, PATCH) as reader:
        result = analyse_slide(reader, tiny_classifier)
    by_cell = {(t.column, t.row): p for t, p in zip(result.tiles, result.p_alone)}
    expected = tiny_classifier.probabilities([image for image, _, _ in patches()])
    got = np.array([by_cell[x // PATCH, y // PATCH] for _, x, y in patches()])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert result.context is None and np.array_equal(result.p_idc, result.p_alone)  # the tiny bundle has no rule


def test_the_bundles_slide_context_rule_runs_on_the_slide_grid(slides, tiny_classifier):
    engine = copy.copy(tiny_classifier)
    engine.bundle = dataclasses.replace(engine.bundle, slide_context={"radius": 1, "weight": 0.5, "threshold": 0.4})
    with SlideReader(slides["coarse"], MODEL_MPP, PATCH) as reader:
        result = analyse_slide(reader, engine)
    cells = [(t.column, t.row) for t in result.tiles]
    expected = with_context(["s"] * len(cells), [c * GRID for c, _ in cells], [r * GRID for _, r in cells],
                            result.p_alone, 1, 0.5)
    np.testing.assert_allclose(result.p_idc, expected, atol=1e-6)
    assert result.threshold == 0.4 and result.context["radius"] == 1
    assert not np.allclose(result.p_idc, result.p_alone)


def test_a_bundle_normalising_per_slide_normalises_every_tile_with_the_slides_stain(slides, tiny_classifier):
    from idc.core.context import logit
    from idc.slides.stain import StainStatistics, normalise

    recoloured = StainStatistics()  # the target: the same tissue as another lab stains it
    for image, _, _ in patches():
        recoloured.add(restained(image))
    target = recoloured.stain()
    engine = copy.copy(tiny_classifier)
    engine.bundle = dataclasses.replace(engine.bundle, stain_normalization={
        "method": "slide", "target_mean": list(target.mean), "target_std": list(target.std)})
    with SlideReader(slides["coarse"], MODEL_MPP, PATCH) as reader:
        result = analyse_slide(reader, engine, batch_size=4)
        images = reader.read(result.tiles)
    own = StainStatistics()  # 15 tissue tiles, under SAMPLE_TILES: the slide's stain is all of them
    for image in images:
        own.add(image)
    normalised = [normalise(image, own.stain(), target) for image in images]
    assert np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(normalised, images)]) > 3
    np.testing.assert_allclose(result.p_alone, tiny_classifier.probabilities(normalised), atol=1e-5)
    # and without the normalisation the answers differ: in logits, as the tiny model is sure of every tile
    assert np.abs(logit(tiny_classifier.probabilities(images)) - logit(result.p_alone)).max() > 0.1


def test_outputs_csv_geojson_heatmap_summary(slides, tiny_classifier, make_config, tmp_path):
    config = make_config(Slides={"output_dir": str(tmp_path / "out")})
    report, result, folder = process_slide(config, tiny_classifier, slides["fine"])
    assert folder == tmp_path / "out" / "fine" and sorted(p.name for p in folder.iterdir()) == sorted(FILES.values())
    rows = list(csv.DictReader((folder / "tiles.csv").open()))
    assert tuple(rows[0]) == TILE_FIELDS and len(rows) == len(result.tiles) == report["tiles"]["classified"]
    assert {(int(r["x"]), int(r["y"])) for r in rows} == {(c * 400, r * 400) for c, r in IDC_CELLS + BENIGN_CELLS}
    assert all(int(r["width"]) == 400 for r in rows)
    assert report["idc_tiles"] == sum(int(r["idc"]) for r in rows)
    assert report["tiles_to_review"] == sum(int(r["needs_review"]) for r in rows)
    assert report["tissue"]["area_mm2"] == pytest.approx(15 * 0.04, rel=0.15)  # 15 tiles of 200 um
    assert report["idc_area_mm2"] == pytest.approx(report["idc_tiles"] * 0.04)
    width, height = report["slide"]["width"], report["slide"]["height"]
    tiles = json.loads((folder / "tiles.geojson").read_text())
    assert tiles["type"] == "FeatureCollection" and len(tiles["features"]) == len(rows)
    for feature in tiles["features"]:
        assert feature["geometry"]["type"] == "Polygon" and feature["properties"]["objectType"] == "tile"
        assert feature["properties"]["classification"]["name"] in ("IDC", "no IDC")
        assert 0 <= feature["properties"]["measurements"]["P(IDC)"] <= 1
        for x, y in feature["geometry"]["coordinates"][0]:
            assert 0 <= x <= width and 0 <= y <= height
    regions = json.loads((folder / "regions.geojson").read_text())
    from shapely.geometry import shape

    area = sum(shape(f["geometry"]).area for f in regions["features"])
    assert area == pytest.approx(report["idc_tiles"] * 400 * 400)
    assert all(f["properties"]["classification"]["name"] == "IDC" for f in regions["features"])
    overlay = Image.open(folder / "overlay.png")
    assert overlay.size == (COLUMNS, ROWS) and overlay.mode == "RGBA"
    alpha = np.asarray(overlay.getchannel("A"))
    assert {(c, r) for r, c in zip(*np.nonzero(alpha))} == set(IDC_CELLS + BENIGN_CELLS)
    heatmap = np.asarray(Image.open(folder / "heatmap.png").convert("RGB"))
    assert heatmap.shape[:2] == (ROWS * 8, COLUMNS * 8)  # 8 mask pixels a tile
    assert tuple(heatmap[0, 0]) == GLASS  # glass stays as it is


def test_a_slide_without_scale_needs_mpp(tmp_path, tiny_classifier, make_config):
    path = write_slide(tmp_path / "noscale.tiff", paste(patches(), (COLUMNS * PATCH, ROWS * PATCH)), None, levels=1)
    with pytest.raises(SlideError, match=r"does not say its scale.*--mpp"):
        SlideReader(path, MODEL_MPP, PATCH)
    config = make_config(Slides={"output_dir": str(tmp_path / "out"), "default_mpp": 4.0})
    report, _, _ = process_slide(config, tiny_classifier, path)
    assert report["slide"]["mpp_source"] == "given" and report["tiles"]["classified"] == 15


def test_bad_slides_say_what_is_wrong(tmp_path, slides, tiny_classifier):
    not_a_slide = tmp_path / "photo.svs"
    Image.new("RGB", (60, 60), (200, 100, 100)).save(not_a_slide, "PNG")
    with pytest.raises(SlideError, match="not a slide OpenSlide can read"):
        SlideReader(not_a_slide, MODEL_MPP, PATCH)
    with pytest.raises(SlideError, match="no slide at"):
        SlideReader(tmp_path / "absent.svs", MODEL_MPP, PATCH)
    truncated = tmp_path / "truncated.tiff"
    data = slides["fine"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="truncated or corrupt|not a slide OpenSlide can read"):
        with SlideReader(truncated, MODEL_MPP, PATCH) as reader:
            analyse_slide(reader, tiny_classifier)
    glass = write_slide(tmp_path / "glass.tiff", paste([], (600, 400)), MODEL_MPP, levels=1)
    with pytest.raises(SlideError, match="no tissue found"):
        with SlideReader(glass, MODEL_MPP, PATCH) as reader:
            analyse_slide(reader, tiny_classifier)
    with pytest.raises(SlideError, match="smaller than one tile"):
        SlideReader(write_slide(tmp_path / "tiny.tiff", paste([], (40, 40)), MODEL_MPP, levels=1), MODEL_MPP, PATCH)


def test_a_stopped_analysis_writes_nothing(slides, tiny_classifier, make_config, tmp_path):
    config = make_config(Slides={"output_dir": str(tmp_path / "out"), "batch_size": 4})
    calls = []
    with pytest.raises(Stopped):
        process_slide(config, tiny_classifier, slides["coarse"], should_stop=lambda: calls.append(1) or len(calls) > 1)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_slide_ids_are_safe_folder_names():
    assert slide_id("/scans/TCGA-A1 B2.svs") == "TCGA-A1_B2"
    assert slide_id("../../etc/passwd.svs") == "passwd"
    assert slide_id("/x/@@.svs") == "slide"


def test_inception_test_classifies_a_slide(slides, tiny_project, tmp_path):
    config, _ = tiny_project
    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, str(ROOT / "inception_test.py"), "--config", str(config.path), "--keras",
                          "--slide", str(slides["fine"]), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "-- Slide fine.tiff: 4800 x 2800 px at 0.5 um/px (from the slide)" in run.stdout
    assert "15 tiles classified" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiles"]["classified"] == 15
    bad = subprocess.run([sys.executable, str(ROOT / "inception_test.py"), "--config", str(config.path), "--keras",
                          "--slide", str(ROOT / "README.md")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 1 and "!! README.md is not a slide OpenSlide can read" in bad.stdout


def test_ctrl_c_stops_a_slide_and_leaves_nothing_half_written(tiny_project, tmp_path):
    """SIGINT while the tiles stream through the engine (one tile a call, so it is still running)."""
    import json as json_module
    import os
    import signal
    import time

    config, _ = tiny_project
    raw = json_module.loads(config.path.read_text())
    raw["Slides"] = {**raw.get("Slides", {}), "batch_size": 1}
    slow = tmp_path / "confs.json"
    slow.write_text(json_module.dumps(raw))
    rng = np.random.default_rng(1)
    tissue = [(np.asarray(patch_image(int(rng.integers(2)), rng)), c * PATCH, r * PATCH) for c in range(40) for r in range(40)]
    path = write_slide(tmp_path / "big.tiff", paste(tissue, (40 * PATCH, 40 * PATCH)), MODEL_MPP, levels=1)
    out = tmp_path / "out" / "big"
    process = subprocess.Popen([sys.executable, str(ROOT / "inception_test.py"), "--config", str(slow), "--keras",
                                "--slide", str(path), "--out", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               # as from a terminal: a test run started in the background (`&`) ignores SIGINT,
                               # and a child would inherit that and never see the Ctrl-C
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        os.set_blocking(process.stderr.fileno(), False)
        seen, deadline = "", time.monotonic() + 120
        while "big.tiff" not in seen and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            seen += (process.stderr.read() or b"").decode(errors="replace")  # the progress bar: tiles are streaming
        assert "big.tiff" in seen and process.poll() is None, seen[-2000:]
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stdout.decode(errors="replace")
    assert not out.parent.exists() or not list(out.parent.iterdir())  # no outputs, no .partial folder
