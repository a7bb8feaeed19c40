"""The evaluation's HTML report (index.html in the report folder; opens offline, no scripts).

It gathers what a reviewer of the model wants on one page: the metrics with their patient-
bootstrap intervals (patch-alone and with slide context), the plots, a table of patients, every
patient's slide heatmap (tissue mosaic | P(IDC) overlay | truth, each patch at its slide
position), and a gallery of missed IDC patches beside their nearest negatives in feature space
(the article's "very similar images from opposite classes"). Images are written into the report
folder, so it can be copied or zipped whole.
"""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from idc.core.context import GRID, describe_rule
from idc.core.preprocessing import decode_image

CELL = 12  # px per patch in the heatmaps: a whole slide stays a few hundred px wide
GAP = 6  # px between the three panels
BACKGROUND = (255, 255, 255)
TRUTH_COLOURS = {0: (70, 130, 200), 1: (215, 50, 40)}  # blue: no IDC, red: IDC (the alarm's LEDs)


def grid_positions(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Each patch's (column, row) on the patient's slide grid, from 0, and the grid's (width, height)."""
    columns = np.array([int(r["x"]) // GRID for r in rows])
    lines = np.array([int(r["y"]) // GRID for r in rows])
    columns, lines = columns - columns.min(), lines - lines.min()
    return columns, lines, (int(columns.max()) + 1, int(lines.max()) + 1)


def p_colour(p: np.ndarray) -> np.ndarray:
    """P(IDC) as colour: blue (0) through white (0.5) to red (1), (N, 3) uint8."""
    p = np.clip(np.asarray(p, dtype=float), 0, 1)[:, None]
    blue, white, red = (np.array(c, dtype=float) for c in ((40, 90, 200), (255, 255, 255), (215, 40, 30)))
    colour = np.where(p < 0.5, blue + (white - blue) * (p / 0.5), white + (red - white) * ((p - 0.5) / 0.5))
    return colour.round().astype(np.uint8)


def slide_panels(rows: list[dict], cell: int = CELL, load=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One patient's (mosaic, overlay, truth) images, (H, W, 3) uint8 each, a `cell`-px square per
    patch at its slide position; white where the slide has no patch. `load(row)` gives a patch's
    RGB pixels (default: decode its file); the overlay blends the tissue with P(IDC)'s colour."""
    load = load or (lambda row: decode_image(row["file"]))
    columns, lines, (width, height) = grid_positions(rows)
    mosaic = np.full((height * cell, width * cell, 3), BACKGROUND, dtype=np.uint8)
    overlay, truth = mosaic.copy(), mosaic.copy()
    colours = p_colour([r["p_idc"] for r in rows])
    for row, column, line, colour in zip(rows, columns, lines, colours):
        tile = np.asarray(Image.fromarray(load(row)).resize((cell, cell), Image.BILINEAR))
        area = (slice(line * cell, (line + 1) * cell), slice(column * cell, (column + 1) * cell))
        mosaic[area] = tile
        overlay[area] = (0.45 * tile + 0.55 * colour).round().astype(np.uint8)
        truth[area] = TRUTH_COLOURS[int(row["label"])]
    return mosaic, overlay, truth


def side_by_side(panels: list[np.ndarray], gap: int = GAP) -> np.ndarray:
    """The panels left to right, each framed in light grey (the slide's background is white too)."""
    panels = [np.pad(p, ((1, 1), (1, 1), (0, 0)), constant_values=200) for p in panels]
    height = max(p.shape[0] for p in panels)
    parts = []
    for panel in panels:
        padded = np.full((height, panel.shape[1], 3), BACKGROUND, dtype=np.uint8)
        padded[:panel.shape[0]] = panel
        parts += [padded, np.full((height, gap, 3), BACKGROUND, dtype=np.uint8)]
    return np.concatenate(parts[:-1], axis=1)


def save_patient_heatmaps(report_dir: Path, rows: list[dict], cell: int = CELL) -> dict[str, str]:
    """heatmaps/patient_<id>.png for every patient; returns patient -> path relative to the report."""
    by_patient = defaultdict(list)
    for row in rows:
        by_patient[row["patient"]].append(row)
    folder = report_dir / "heatmaps"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for patient, items in sorted(by_patient.items()):
        name = f"heatmaps/patient_{_safe(patient)}.png"
        Image.fromarray(side_by_side(list(slide_panels(items, cell)))).save(report_dir / name)
        written[patient] = name
    return written


def nearest(queries: np.ndarray, pool: np.ndarray, k: int) -> np.ndarray:
    """Indices (Q, k) of each query's k nearest rows of `pool` (Euclidean, on standardised features)."""
    mean, std = pool.mean(axis=0), pool.std(axis=0) + 1e-6
    q, x = (queries - mean) / std, (pool - mean) / std
    distances = (q ** 2).sum(1)[:, None] - 2 * q @ x.T + (x ** 2).sum(1)[None, :]
    return np.argsort(distances, axis=1)[:, :k]


def save_gallery(report_dir: Path, missed: list[dict], neighbours: list[list[dict]], scale: int = 2) -> list[dict]:
    """Copies (enlarged) of each missed IDC patch and its nearest negatives into gallery/."""
    folder = report_dir / "gallery"
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (row, near) in enumerate(zip(missed, neighbours)):
        images = []
        for j, item in enumerate([row, *near]):
            name = f"gallery/{i:03d}_{j}.png"
            image = Image.fromarray(decode_image(item["file"]))
            image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(report_dir / name)
            images.append({"src": name, "row": item})
        entries.append({"missed": images[0], "negatives": images[1:]})
    return entries


def write_index(report_dir: Path, result: dict, patients: list[dict], plots: list[Path],
                heatmaps: dict[str, str], gallery: list[dict], tradeoff: list[dict] | None = None) -> Path:
    """index.html: every figure and table of the evaluation, linking only files in the report folder."""
    e = html.escape
    parts = [f"<h1>IDC Classifier: evaluation on {e(str(result['evaluated_on']))}</h1>",
             f"<p>{result['patches']} patches of {result['patients']} patients; model "
             f"{e(str(result['model'].get('backend', '')))}, threshold {result['threshold']}. "
             "Intervals: 95 %, bootstrap over patients (patches of one patient are not independent).</p>",
             "<h2>Metrics</h2>", _metrics_table(result)]
    if plots:
        parts.append("<h2>Plots</h2><div class=row>" + "".join(
            f'<figure><img src="{e(p.name)}" alt="{e(p.stem)}"><figcaption>{e(p.stem.replace("_", " "))}'
            "</figcaption></figure>" for p in plots if p.parent == report_dir) + "</div>")
    if tradeoff:
        parts += ["<h2>Threshold trade-off (validation patients, as chosen at training)</h2>",
                  _table(tradeoff, list(tradeoff[0]))]
    columns = list(patients[0]) if patients else []
    rows = [{**p, "heatmap": f'<a href="{e(heatmaps[p["patient"]])}">slide</a>' if p["patient"] in heatmaps else ""}
            for p in patients]
    parts += ["<h2>Patients</h2>", _table(rows, [*columns, "heatmap"], raw={"heatmap"})]
    parts.append("<h2>Slide heatmaps</h2><p>Each patient: tissue mosaic | P(IDC) over the tissue (blue 0, "
                 "white 0.5, red 1) | truth (red IDC, blue none); one square per patch at its slide position.</p>")
    parts += [f'<figure><img src="{e(src)}" alt="patient {e(str(p))}"><figcaption>patient {e(str(p))}'
              "</figcaption></figure>" for p, src in heatmaps.items()]
    parts.append("<h2>Missed IDC beside their nearest negatives</h2>")
    if gallery:
        parts.append("<p>Left: a missed IDC patch (its P(IDC)); right: the nearest patches without IDC in the "
                     "model's feature space. Very similar images from opposite classes.</p>")
        for entry in gallery:
            cells = [entry["missed"], *entry["negatives"]]
            parts.append("<div class=row>" + "".join(
                f'<figure><img src="{e(c["src"])}" alt="{e(Path(c["row"]["file"]).name)}"><figcaption>'
                f'{"IDC, missed" if i == 0 else "no IDC"} {float(c["row"]["p_idc"]):.2f}<br>'
                f'{e(Path(c["row"]["file"]).name)}</figcaption></figure>' for i, c in enumerate(cells)) + "</div>")
    else:
        parts.append("<p>No missed IDC patches.</p>")
    page = ("<!doctype html><html lang=en><head><meta charset=utf-8><title>IDC evaluation</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}"
            ".row{display:flex;flex-wrap:wrap;gap:12px}figure{margin:6px}figcaption{font-size:80%;color:#444}"
            "</style></head><body>" + "\n".join(parts) + "</body></html>\n")
    path = report_dir / "index.html"
    path.write_text(page)
    return path


def _metrics_table(result: dict) -> str:
    names = ["balanced_accuracy", "f1_idc", "sensitivity", "specificity", "roc_auc", "accuracy", "precision"]
    blocks = [("each patch alone", result)]
    if result.get("slide_context"):
        blocks.append((f"with slide context ({describe_rule(result['slide_context'])})", result["slide_context"]))
    rows = []
    for name in names:
        row = {"metric": name}
        for title, block in blocks:
            interval = block.get("intervals_95", {}).get(name)
            row[title] = f"{block[name]:.4f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
        rows.append(row)
    return _table(rows, ["metric", *[title for title, _ in blocks]])


def _table(rows: list[dict], columns: list[str], raw: set[str] = frozenset()) -> str:
    def cell(column, value):
        if column in raw:
            return str(value)
        if isinstance(value, float):
            return f"{value:.4f}"
        return html.escape("" if value is None else str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(c, r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(text))
