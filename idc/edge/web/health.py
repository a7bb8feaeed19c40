"""What monitoring reads: `GET /api/health` (JSON) and `GET /metrics` (Prometheus); docs/api.md."""

from __future__ import annotations

import time

from flask import Blueprint, Response

from idc.edge.web.auth import check_access
from idc.edge.web.protocol import HEALTH, METRICS
from idc.edge.web.state import current_state

bp = Blueprint("health", __name__)


@bp.get(HEALTH)
def health():
    state = current_state()
    model = state.model_info()
    body = {
        "Response": "OK" if model["loaded"] else "FAILED",
        "ResponseMessage": "ready" if model["loaded"] else "model not loaded",
        "model": model,
        "mqtt": state.mqtt_status(),
        "uptime_seconds": round(time.monotonic() - state.started, 3),
        "requests": state.counts,
        "auth_required": state.auth_required,
        "max_upload_bytes": state.config.Server.max_upload_bytes,
        "max_image_side": state.max_side,
        "identity": state.identity,
        "review": state.review_status(),
        "slides": state.slides_status(),
    }
    return body, 200 if model["loaded"] else 503


@bp.get(METRICS)
def metrics():
    """With Server.api_key set, /metrics needs the key as well (Prometheus: `authorization:
    {credentials: KEY}` in the scrape config)."""
    check_access()
    metrics = current_state().metrics
    return Response(metrics.exposition(), content_type=metrics.CONTENT_TYPE, headers={"Cache-Control": "no-store"})
