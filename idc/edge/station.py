"""The review station's parts, registered on the API's Flask app by create_app: the pages and
review queue (idc.edge.review), POST /api/infer/batch (idc.edge.batch), /metrics
(idc.edge.metrics), and the model's identity on every reply (idc.edge.identity)."""

from __future__ import annotations

import logging

from flask import g, request

from idc.edge import batch, metrics, review
from idc.edge.identity import identity_headers, identity_label

log = logging.getLogger(__name__)

# The pages load nothing from elsewhere: scripts, styles and images come from this server only.
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def init_app(app, state) -> None:
    review.init_app(app, state)
    batch.init_app(app)
    metrics.init_app(app)
    headers = identity_headers(state.identity)

    @app.after_request
    def model_headers(response):
        response.headers.update(headers)
        if response.mimetype == "text/html":
            response.headers.setdefault("Content-Security-Policy", PAGE_POLICY)
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    @app.after_request
    def queue_for_review(response):
        """/api/infer's flagged patches go to the review queue too, written by a background thread."""
        prediction, data = g.get("prediction"), g.get("upload")
        if prediction is None or data is None or response.status_code != 200:
            return response
        if review.wants_review(prediction.label, prediction.needs_review, state.config.Server.review_all_idc):
            from idc.edge.api import image_format

            upload = request.files.get("file") if request.mimetype == "multipart/form-data" else None
            review.queue_later(review.QueueEntry(
                data, image_format(data), prediction.p_idc, prediction.label, prediction.needs_review,
                upload.filename if upload is not None else None, identity_label(state.identity)))
        return response
