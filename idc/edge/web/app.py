"""The edge server's application factory: the only place that creates the Flask app.

`create_app(config, classifier, publisher)` builds it: the shared state (idc.edge.web.state) with
its slide worker (idc.edge.web.slides: started here, stopped by `app.extensions["idc"].close()`),
the blueprints (/api/infer, /api/infer/batch, /api/health and /metrics, the review station, its
Slides page and its login), one hook before and one after every request, and the JSON error
handlers. Nothing heavy happens at import; tests build apps with their own config and a
classifier of their own.
`idc.edge.web.serving.serve(app, config)` runs it. The HTTP contract is docs/api.md.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from typing import TYPE_CHECKING

from flask import Flask, g, request
from PIL import Image
from werkzeug.exceptions import HTTPException, InternalServerError

from idc.core.config import Config
from idc.core.errors import ApiError
from idc.edge.identity import identity_headers
from idc.edge.web import auth, batch, health, infer, review, slides
from idc.edge.web.protocol import HEALTH, INFER, InMemoryRequest, failed
from idc.edge.web.state import EXTENSION, ServerState

if TYPE_CHECKING:
    from idc.edge.engine import Classifier

log = logging.getLogger(__name__)

# The one inline style the pages hold: OpenSeadragon (the slide viewer, static/openseadragon/) adds it
# (a focus outline on touch screens); allowed by its hash, so no other inline style or script runs.
OPENSEADRAGON_STYLE = "@media (hover: none) {    .openseadragon-canvas:focus {        outline: none !important;    }}"
STYLE_HASH = "'sha256-" + base64.b64encode(hashlib.sha256(OPENSEADRAGON_STYLE.encode()).digest()).decode() + "'"
# The pages load nothing from elsewhere: scripts, styles and images come from this server only.
PAGE_POLICY = (f"default-src 'self'; img-src 'self' blob: data:; style-src 'self' {STYLE_HASH}; "
               "script-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def create_app(config: Config, classifier: Classifier | None = None, publisher=None) -> Flask:
    """The Flask app serving `classifier` (None: not loaded, /api/infer answers 503).

    `publisher` receives every result (an idc.iot.publisher.ResultPublisher or alike); when None, the
    app makes and starts its own from the config (it does nothing while IoTJumpWay.enabled is
    false), stopped by `app.extensions["idc"].close()`.
    """
    server = config.Server
    if server.api_key == "":
        log.warning("Server.api_key is an empty string: no API key is required")
    owns_publisher = publisher is None
    if publisher is None:
        from idc.iot.publisher import ResultPublisher  # paho: only when the app makes its own

        publisher = ResultPublisher(config).start()
    # Pillow's decompression-bomb guard (process-wide): warn above the largest accepted image and
    # refuse twice that before decoding. Only ever lowered here, never loosened.
    pixels = max(1, server.max_image_side) ** 2
    if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > pixels:
        Image.MAX_IMAGE_PIXELS = pixels

    app = Flask(__name__, static_url_path="/ui")  # static/ and templates/ beside this module
    app.request_class = InMemoryRequest
    app.json.sort_keys = False  # keep the contract's field order: Response first
    app.secret_key = auth.session_secret(server.api_key)
    app.config.update(
        MAX_CONTENT_LENGTH=server.max_upload_bytes,
        # Werkzeug counts form parts; allow a full batch (and a few plain fields) before its own 413.
        MAX_FORM_PARTS=max(1000, server.batch_max_files + 16),
        SESSION_COOKIE_NAME="idc_session", SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=bool(server.tls_cert))
    state = ServerState(config, classifier, publisher, owns_publisher)
    state.slides = slides.SlideWorker(config, classifier, state.review, state.model_label)
    app.extensions[EXTENSION] = state
    for blueprint in (infer.bp, batch.bp, health.bp, review.bp, slides.bp, auth.bp):
        app.register_blueprint(blueprint)
    model_headers = identity_headers(state.identity)

    @app.before_request
    def start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def finish(response):
        """Every reply: the model's identity headers (and the page policy on pages), then the
        /api/infer counters, the request metrics and one log line."""
        response.headers.update(model_headers)
        if response.mimetype == "text/html":
            response.headers.setdefault("Content-Security-Policy", PAGE_POLICY)
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        if request.path == INFER:
            state.count(response.status_code == 200)
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        state.metrics.observe_request(endpoint, request.method, response.status_code, seconds)
        outcome = g.get("outcome") or (f"error={response.status!r}" if response.status_code >= 400 else "-")
        # A view may ask for a quieter line (a viewer's Deep Zoom tiles: dozens a pan); failures stay at INFO.
        level = g.get("log_level", logging.INFO) if response.status_code < 400 else logging.INFO
        log.log(level, "%s %s %s %d bytes=%d %s latency_ms=%.1f", request.remote_addr, request.method, request.path,
                response.status_code, request.content_length or 0, outcome, seconds * 1000)
        return response

    def refuse(status: int, message: str, headers=None):
        g.outcome = f"error={message!r}"
        return failed(status, message, headers)

    @app.errorhandler(ApiError)
    def api_error(err: ApiError):
        return refuse(err.status, err.message, err.headers)

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        allowed = [m for m in getattr(err, "valid_methods", None) or () if m not in ("HEAD", "OPTIONS")]
        messages = {
            404: f"not found: {request.path} (the API is POST {INFER} and GET {HEALTH})",
            405: f"method {request.method} not allowed on {request.path}; use {' or '.join(allowed)}",
            413: f"upload too large: the limit is {server.max_upload_bytes} bytes",
        }
        headers = {k: v for k, v in err.get_headers() if k.lower() != "content-type"}
        return refuse(err.code or 500, messages.get(err.code, err.name), headers)

    @app.errorhandler(InternalServerError)
    def server_error(err: InternalServerError):
        # Flask has logged the original exception with its traceback; the client gets one line.
        g.outcome = "error='internal server error'"
        return failed(500, "internal server error: the fault is logged on the server")

    state.slides.start()  # last: the app is complete before a slide can be analysed
    return app
