"""The review station's CSV export: reviewed patches as extra labelled training data.

Written by the edge server (`GET /api/review/export.csv`), read by `trainer.py sort --extra-labels
CSV`. Standard library only: the edge box writes it, the training machine reads it. One row per
reviewed patch, the image itself inside the row (base64), so the one file is the whole export:

| column | meaning |
|---|---|
| `id` | the queue item's number in the review database |
| `file` | the name the patch was uploaded under ("" when none was given) |
| `patient`, `x`, `y` | from a Kaggle patch name (`<patient>_idx5_x<X>_y<Y>_class<C>.png`), else "" |
| `label` | the reviewed truth, the label the reviewer set: 1 IDC, 0 no IDC; "" when unsure (not training data) |
| `model_label`, `p_idc` | what the model said (label at its threshold, P(IDC)) |
| `decision` | derived from the two: agree (`label` = `model_label`), disagree (they differ), unsure |
| `note`, `reviewer`, `reviewed_at` | the reviewer's note and name (may be ""), UTC ISO time |
| `model` | the model that classified it: name, precision, content hash |
| `sha256` | of the image bytes |
| `format`, `image_base64` | the image's format (PNG, JPEG, BMP, TIFF) and its bytes, base64 |

The reviewer sets the label (LABELS: idc, no_idc, unsure); clients of the first station sent a
decision instead (DECISIONS), which converts to the label against the model's verdict (agree keeps
it, disagree flips it): `label_of_decision`, `decision_of_label`.
"""

from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import hashlib
import io
import sys
from pathlib import Path

from idc.core.errors import ReviewExportError

FIELDS = ("id", "file", "patient", "x", "y", "label", "model_label", "p_idc", "decision", "note", "reviewer",
          "reviewed_at", "model", "sha256", "format", "image_base64")
LABELS = ("idc", "no_idc", "unsure")  # what a reviewer says the patch is
DECISIONS = ("agree", "disagree", "unsure")  # the first station's reviews: relative to the model's verdict
LABEL_VALUES = {"idc": 1, "no_idc": 0, "unsure": None}


def label_name(value: int) -> str:
    """A model label (1, 0) as a reviewer's label ("idc", "no_idc")."""
    return "idc" if int(value) == 1 else "no_idc"


def label_of_decision(decision: str, model_label: int) -> str:
    """The reviewer's label a decision means: agree keeps the model's label, disagree flips it, unsure."""
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
    if decision == "unsure":
        return "unsure"
    return label_name(model_label if decision == "agree" else 1 - int(model_label))


def decision_of_label(label: str, model_label: int) -> str:
    """The decision a reviewer's label amounts to: agree when it is the model's, disagree when not, unsure."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {', '.join(LABELS)}, not {label!r}")
    if label == "unsure":
        return "unsure"
    return "agree" if label == label_name(model_label) else "disagree"


def export_row(item: dict) -> dict:
    """One CSV row (FIELDS) from a reviewed queue item (the review store's dict, with `image`): `label`
    is the reviewer's label (`review_label`; from the decision for an item that has none)."""
    review_label = item.get("review_label") or label_of_decision(item["decision"], item["label"])
    label = LABEL_VALUES[review_label]
    return {
        "id": item["id"], "file": item["name"] or "", "patient": item["patient"] or "",
        "x": "" if item["x"] is None else item["x"], "y": "" if item["y"] is None else item["y"],
        "label": "" if label is None else label, "model_label": item["label"], "p_idc": f"{item['p_idc']:.6f}",
        "decision": decision_of_label(review_label, item["label"]), "note": item["note"] or "",
        "reviewer": item["reviewer"] or "", "reviewed_at": item["reviewed_at"] or "",
        "model": item["model"] or "", "sha256": item["sha256"], "format": item["format"],
        "image_base64": base64.b64encode(item["image"]).decode("ascii"),
    }


def write_csv(items, out: io.TextIOBase) -> int:
    """Write reviewed items as the export CSV; returns the number of rows."""
    writer = csv.DictWriter(out, FIELDS, lineterminator="\n")
    writer.writeheader()
    count = 0
    for item in items:
        writer.writerow(export_row(item))
        count += 1
    return count


@dataclasses.dataclass(frozen=True)
class LabelledPatch:
    """A reviewed patch with a label, as the trainer takes it."""

    id: str
    label: int
    image: bytes
    format: str
    patient: str  # "" when the upload had no Kaggle name
    x: int | None
    y: int | None
    sha256: str


def read_csv(path: str | Path) -> list[LabelledPatch]:
    """The labelled rows of an export CSV (rows without a label, i.e. "unsure", are left out).

    Raises ReviewExportError naming the file and row when the file is not an export or a row is bad."""
    path = Path(path)
    csv.field_size_limit(sys.maxsize)  # an image can be larger than csv's 128 KiB field default
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as err:
        raise ReviewExportError(f"cannot read the review export {path}: {err.strerror}") from None
    with handle:
        reader = csv.DictReader(handle)
        missing = [f for f in ("label", "image_base64", "sha256", "format") if f not in (reader.fieldnames or ())]
        if missing:
            raise ReviewExportError(f"{path} is not a review export (no column {missing[0]!r}): download it from "
                                    "the review station (GET /api/review/export.csv)")
        patches = []
        for line, row in enumerate(reader, start=2):
            if row["label"] == "":
                continue
            try:
                image = base64.b64decode(row["image_base64"], validate=True)
                label = int(row["label"])
                if label not in (0, 1):
                    raise ValueError(f"label must be 0 or 1, not {label}")
                if hashlib.sha256(image).hexdigest() != row["sha256"]:
                    raise ValueError("the image does not match its sha256 (truncated or edited file?)")
                x = int(row["x"]) if row.get("x") else None
                y = int(row["y"]) if row.get("y") else None
            except (ValueError, binascii.Error) as err:
                raise ReviewExportError(f"{path}, line {line}: {err}") from None
            patches.append(LabelledPatch(row.get("id", ""), label, image, row["format"], row.get("patient", ""),
                                         x, y, row["sha256"]))
    return patches
