"""`POST /api/infer`: one image, the 2018 clients' endpoint (contract: docs/api.md)."""

from __future__ import annotations

from flask import Blueprint, g, request

from idc.core.errors import ApiError
from idc.edge.web import pipeline
from idc.edge.web.auth import authorize
from idc.edge.web.protocol import EMPTY_BODY, INFER, answer, upload_bytes
from idc.edge.web.state import current_state

bp = Blueprint("infer", __name__)


@bp.post(INFER)
def infer():
    state = current_state()
    authorize(state, request.headers)
    pipeline.require_model(state)
    data, name = upload_bytes(request)
    if not data:
        raise ApiError(400, EMPTY_BODY)
    prediction = pipeline.classify_one(state, pipeline.Upload(name, data)).prediction
    g.outcome = f"result={prediction.label} p={prediction.p_idc:.4f} review={prediction.needs_review}"
    return answer(prediction)
