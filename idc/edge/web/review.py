"""The review station: the pages a pathologist uses and the review queue's API (docs/api.md,
docs/review-station.md). The queue itself is idc.edge.web.store.

- `GET /`: drop patches, or a zip of a patient's patches, see verdicts and the slide mosaic.
- `GET /review`: the queue.
- `GET /api/review/queue?status=pending|reviewed|all&limit=&offset=`: items (without images).
- `GET /api/review/items/<id>/image`; `POST /api/review/items/<id>` with JSON
  `{"decision": "agree"|"disagree"|"unsure", "note": str, "reviewer": str}`.
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
from idc.core.review_export import DECISIONS, write_csv
from idc.edge.web.auth import check_access, login_page, session_ok
from idc.edge.web.protocol import mime
from idc.edge.web.state import current_state

log = logging.getLogger(__name__)

MAX_NOTE = 2000
MAX_REVIEWER = 100

bp = Blueprint("review", __name__)


def _page(template: str):
    state = current_state()
    if state.auth_required and not session_ok():
        return login_page("This review station needs the server's API key.", 401)
    return render_template(template, identity=state.identity, auth=state.auth_required,
                           threshold=getattr(state.classifier, "threshold", None),
                           max_upload_bytes=state.config.Server.max_upload_bytes,
                           batch_max_files=state.config.Server.batch_max_files)


@bp.get("/")
def index_page():
    return _page("index.html")


@bp.get("/review")
def review_page():
    return _page("review.html")


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


@bp.get("/api/review/queue")
def queue():
    check_access()
    status = request.args.get("status", "pending")
    if status not in ("pending", "reviewed", "all"):
        raise ApiError(400, "status must be pending, reviewed or all")
    limit, offset = _int_arg("limit", 100, 1, 1000), _int_arg("offset", 0, 0, 10**9)
    store = current_state().reviews()
    items = _store_call(store.items, status, limit, offset)
    counts = _store_call(store.counts)
    return {"Response": "OK", "ResponseMessage": f"{counts['pending']} waiting for review",
            "Pending": counts["pending"], "Reviewed": counts["reviewed"], "Items": items}


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
                       'send JSON: {"decision": "agree"|"disagree"|"unsure", "note": "...", "reviewer": "..."}')
    decision, note, reviewer = body.get("decision"), body.get("note") or "", body.get("reviewer") or ""
    if decision not in DECISIONS:
        raise ApiError(400, f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise ApiError(400, f"note must be text of at most {MAX_NOTE} characters")
    if not isinstance(reviewer, str) or len(reviewer) > MAX_REVIEWER:
        raise ApiError(400, f"reviewer must be a name of at most {MAX_REVIEWER} characters")
    item = _store_call(current_state().reviews().review, item_id, decision, note.strip(), reviewer.strip())
    if item is None:
        raise ApiError(404, f"no review item {item_id}")
    log.info("review: item %d %s by %s", item_id, decision, reviewer.strip() or "(no name)")
    return {"Response": "OK", "ResponseMessage": f"item {item_id}: {decision}", "Item": item}


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
