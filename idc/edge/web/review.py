"""The review station: the pages a pathologist uses and the review queue's API (docs/api.md,
docs/review-station.md). The queue itself is idc.edge.web.store.

- `GET /`: drop patches, or a zip of a patient's patches, see verdicts and the slide mosaic.
- `GET /review`: the queue (`?item=<id>`: that item alone, as a slide's viewer links to it).
- `GET /api/review/queue?status=pending|reviewed|all&order=uncertain|oldest|newest|reviewed&needs_review=1
  &disagreements=1&patient=&item=&limit=&offset=`: items (without images), most uncertain first by default.
- `GET /api/review/items/<id>/image`; `POST /api/review/items/<id>` with JSON
  `{"label": "idc"|"no_idc"|"unsure", "note": str, "reviewer": str}` (or, from the first station's clients,
  `{"decision": "agree"|"disagree"|"unsure", ...}`, converted to the label against the model's verdict).
- `GET /api/review/export.csv`: reviewed items as extra training data (idc.core.review_export).

A store that fails (corrupt, locked, unwritable) is answered with a JSON 503 (Retry-After when
locked), never a 500; /api/infer keeps classifying meanwhile.
"""

from __future__ import annotations

import datetime
import io
import logging

from flask import Blueprint, Response, render_template, request

from idc.core.errors import ApiError, ReviewStoreError
from idc.core.review_export import DECISIONS, LABELS, write_csv
from idc.edge.web.auth import check_access, login_page, session_ok
from idc.edge.web.protocol import mime
from idc.edge.web.state import current_state
from idc.edge.web.store import ORDERS, STATUSES

log = logging.getLogger(__name__)

MAX_NOTE = 2000
MAX_REVIEWER = 100
MAX_PATIENT = 100
LABEL_WORDS = {"idc": "IDC", "no_idc": "no IDC", "unsure": "unsure"}
FLAGS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False,
         "": False}

bp = Blueprint("review", __name__)


def number(value: float) -> str:
    """A threshold or band as the rule states it: up to 6 decimals, no trailing zeros (0.495, 0.11, 0.5)."""
    return f"{value:.6f}".rstrip("0").rstrip(".")


def stated_rule(classifier) -> dict | None:
    """The served model's decision rule as the pages state it; None when no model is loaded."""
    threshold, band = getattr(classifier, "threshold", None), getattr(classifier, "review_band", None)
    if threshold is None or band is None:
        return None
    low, high = max(0.0, threshold - band), min(1.0, threshold + band)
    return {"threshold": float(threshold), "review_band": float(band),
            "text": f"IDC when P(IDC) \u2265 {number(threshold)}; needs review within \u00b1{number(band)} of it "
                    f"({number(low)} < P(IDC) < {number(high)})"}


def _threshold() -> float:
    """The served model's threshold (the queue's "uncertain" order); 0.5 when no model is loaded."""
    threshold = getattr(current_state().classifier, "threshold", None)
    return 0.5 if threshold is None else float(threshold)


def login_needed():
    """The key form (401) when the server has a key and this browser has no session; else None."""
    state = current_state()
    if state.auth_required and not session_ok():
        return login_page("This review station needs the server's API key.", 401)
    return None


def render_page(template: str, **values):
    """A page of the station (the key form first when needed), with what every page shows."""
    refused = login_needed()
    if refused is not None:
        return refused
    state = current_state()
    return render_template(template, identity=state.identity, auth=state.auth_required,
                           rule=stated_rule(state.classifier),
                           max_upload_bytes=state.config.Server.max_upload_bytes,
                           batch_max_files=state.config.Server.batch_max_files, **values)


@bp.get("/")
def index_page():
    return render_page("index.html")


@bp.get("/review")
def review_page():
    return render_page("review.html")


def _store_call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ReviewStoreError as err:
        headers = {"Retry-After": "5"} if "locked" in str(err) else {}
        raise ApiError(503, str(err), headers) from None


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, not {raw!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be in {low}..{high}")
    return value


def _flag_arg(name: str) -> bool:
    raw = request.args.get(name)
    if raw is None:
        return False
    if raw.lower() not in FLAGS:
        raise ApiError(400, f"{name} must be 1 or 0 (true or false), not {raw!r}")
    return FLAGS[raw.lower()]


def _choice_arg(name: str, default: str, choices) -> str:
    value = request.args.get(name, default)
    if value not in choices:
        raise ApiError(400, f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


@bp.get("/api/review/queue")
def queue():
    check_access()
    status = _choice_arg("status", "pending", STATUSES)
    order = _choice_arg("order", "uncertain", ORDERS)
    filters = {"needs_review": _flag_arg("needs_review"), "disagreements": _flag_arg("disagreements"),
               "patient": request.args.get("patient") or None, "item": _int_arg("item", 0, 1, 2**63 - 1) or None}
    if filters["patient"] is not None and len(filters["patient"]) > MAX_PATIENT:
        raise ApiError(400, f"patient must be at most {MAX_PATIENT} characters")
    limit, offset = _int_arg("limit", 100, 1, 1000), _int_arg("offset", 0, 0, 10**9)
    store, threshold = current_state().reviews(), _threshold()
    items = _store_call(store.items, status, limit, offset, order=order, threshold=threshold, **filters)
    matching = _store_call(store.matching, status, **filters)
    counts = _store_call(store.counts)
    return {"Response": "OK", "ResponseMessage": f"{counts['pending']} waiting for review",
            "Pending": counts["pending"], "Reviewed": counts["reviewed"], "Matching": matching,
            "Order": order, "Threshold": threshold, "Patients": _store_call(store.patients), "Items": items}


@bp.get("/api/review/items/<int:item_id>/image")
def item_image(item_id: int):
    check_access()
    found = _store_call(current_state().reviews().image, item_id)
    if found is None:
        raise ApiError(404, f"no review item {item_id}")
    data, image_format = found
    response = Response(data, mimetype=mime(image_format))
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response


@bp.post("/api/review/items/<int:item_id>")
def review_item(item_id: int):
    check_access(changes=True)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(415 if not request.is_json else 400,
                       'send JSON: {"label": "idc"|"no_idc"|"unsure", "note": "...", "reviewer": "..."}')
    label, decision = body.get("label"), body.get("decision")
    note, reviewer = body.get("note") or "", body.get("reviewer") or ""
    if label is not None and decision is not None:
        raise ApiError(400, "send the label (idc, no_idc, unsure) or, as the first station did, the decision; "
                            "not both")
    if label is None and decision is None:
        raise ApiError(400, f"label must be one of {', '.join(LABELS)}")
    if label is not None and label not in LABELS:
        raise ApiError(400, f"label must be one of {', '.join(LABELS)}, not {label!r}")
    if decision is not None and decision not in DECISIONS:
        raise ApiError(400, f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise ApiError(400, f"note must be text of at most {MAX_NOTE} characters")
    if not isinstance(reviewer, str) or len(reviewer) > MAX_REVIEWER:
        raise ApiError(400, f"reviewer must be a name of at most {MAX_REVIEWER} characters")
    item = _store_call(current_state().reviews().review, item_id, label, note.strip(), reviewer.strip(),
                       decision=decision)
    if item is None:
        raise ApiError(404, f"no review item {item_id}")
    label, decision = item["review_label"], item["decision"]
    log.info("review: item %d %s (%s) by %s", item_id, label, decision, reviewer.strip() or "(no name)")
    model = "IDC" if item["label"] else "no IDC"
    return {"Response": "OK", "ResponseMessage": f"item {item_id}: {LABEL_WORDS[label]} (the model: {model}; "
                                                 f"{decision})", "Label": label, "Decision": decision, "Item": item}


@bp.get("/api/review/export.csv")
def export_csv():
    check_access()
    store = current_state().reviews()
    _store_call(store.check)  # fail as JSON before the CSV starts
    out = io.StringIO()
    _store_call(write_csv, store.reviewed_with_images(), out)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Response(out.getvalue(), mimetype="text/csv", headers={
        "Content-Disposition": f'attachment; filename="idc-reviews-{stamp}.csv"', "Cache-Control": "no-store"})
