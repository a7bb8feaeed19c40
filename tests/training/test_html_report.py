"""The evaluation's HTML report: slide heatmap geometry, nearest neighbours, and links that resolve."""

import re
from pathlib import Path

import numpy as np
from PIL import Image

from idc.training import html_report
from idc.training.evaluation import evaluate

# A patient whose IDC patches spell an "L" on a 4 x 3 grid (x, y in px, 50 px per patch).
PATTERN = ["X...",
           "X...",
           "XXX."]


def l_shaped_patient(tmp_path: Path) -> list[dict]:
    rows = []
    for line, text in enumerate(PATTERN):
        for column, char in enumerate(text):
            label = int(char == "X")
            path = tmp_path / f"7_idx5_x{1000 + 50 * column}_y{500 + 50 * line}_class{label}.png"
            Image.fromarray(np.full((50, 50, 3), (column * 60, line * 80, 200), np.uint8)).save(path)
            rows.append({"file": str(path), "patient": "7", "x": 1000 + 50 * column, "y": 500 + 50 * line,
                         "label": label, "p_idc": 0.9 if label else 0.1})
    return rows[:-1]  # the last cell (3, 2) has no patch: it must stay background


def test_heatmap_panels_place_each_patch_at_its_slide_position(tmp_path):
    rows = l_shaped_patient(tmp_path)
    mosaic, overlay, truth = html_report.slide_panels(rows, cell=5)
    assert mosaic.shape == overlay.shape == truth.shape == (3 * 5, 4 * 5, 3)
    for line, text in enumerate(PATTERN):
        for column, char in enumerate(text):
            centre = (line * 5 + 2, column * 5 + 2)
            if (line, column) == (2, 3):
                assert tuple(truth[centre]) == tuple(mosaic[centre]) == html_report.BACKGROUND
                continue
            expected = html_report.TRUTH_COLOURS[int(char == "X")]
            assert tuple(truth[centre]) == expected, (line, column)
            # the mosaic holds the patch's own pixels (each patch has its own colour here)
            assert tuple(mosaic[centre]) == (column * 60, line * 80, 200)
            # the overlay is the tissue blended with the colour of the patch's own P(IDC)
            colour = html_report.p_colour([0.9 if char == "X" else 0.1])[0]
            assert np.abs(overlay[centre] - (0.45 * mosaic[centre] + 0.55 * colour)).max() <= 1


def test_p_colour_runs_from_blue_through_white_to_red():
    blue, white, red = html_report.p_colour([0.0, 0.5, 1.0])
    assert blue[2] > blue[0] and tuple(white) == (255, 255, 255) and red[0] > red[2]


def test_nearest_finds_the_closest_rows():
    pool = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [9.0, 1.0]])
    order = html_report.nearest(np.array([[10.0, 0.5], [0.1, 9.0]]), pool, 2)
    assert order.tolist() == [[1, 3], [2, 0]]


def test_every_file_the_report_links_exists(tiny_project, tmp_path):
    config, _ = tiny_project
    evaluate(config, split="test", report_dir=tmp_path / "report", echo=lambda *a: None)
    index = tmp_path / "report" / "index.html"
    page = index.read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(links) >= 5 and "heatmaps/" in page and "training_curves.png" in page
    for link in links:
        assert not re.match(r"[a-z]+:", link) and not link.startswith("/"), link  # offline: relative only
        assert (index.parent / link).is_file(), link
    patients = {row.split(",")[0] for row in (tmp_path / "report" / "per_patient.csv").read_text().splitlines()[1:]}
    assert {f"heatmaps/patient_{p}.png" for p in patients} <= set(links)


def test_the_gallery_finds_a_missed_patchs_nearest_negative_in_feature_space(tiny_project):
    from idc.edge.engine import load_classifier
    from idc.training.evaluation import missed_and_nearest_negatives

    config, _ = tiny_project
    patches = config.model.read_manifest("test")
    negatives = [{"file": str(p.path), "label": 0, "predicted": 0, "p_idc": 0.1} for p in patches if p.label == 0]
    # the same image as a missed IDC patch: its nearest negative in feature space is itself
    missed = {**negatives[3], "label": 1, "p_idc": 0.2}
    found, neighbours = missed_and_nearest_negatives(config, load_classifier(config, "keras"), [*negatives, missed],
                                                     neighbours=2)
    assert found == [missed] and len(neighbours[0]) == 2
    assert neighbours[0][0]["file"] == missed["file"] and all(n["label"] == 0 for n in neighbours[0])
