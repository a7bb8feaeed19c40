"""The edge server's HTTP API: a Flask application factory, compatible with the 2018 clients.

`create_app(config, classifier, publisher)` builds the app; nothing heavy happens at import, and
tests build apps with their own config and a classifier of their own. `serve(app, config)` runs
it: waitress for plain HTTP (the production server), or, when Server.tls_cert and
Server.tls_key are set, werkzeug's threaded server with TLS (waitress has no TLS). For an edge box
reachable from outside a lab network, prefer a TLS-terminating reverse proxy (nginx, Caddy) in
front of the waitress server and leave tls_cert/tls_key unset.

Endpoints
- `POST /api/infer`: the image as the raw body (any `image/*` or `application/octet-stream`
  content type, or none) or as the multipart form field `file`. 200 gives
  `{"Response": "OK", "ResponseMessage": "IDC Detected!" | "IDC Not Detected!", "Results": 1 | 0,
  "Confidence": P(IDC), "NeedsReview": bool, "Seconds": decode + inference time}`.
- `GET /api/health`: model, MQTT and request counters; 503 while no model is loaded.

Every error is JSON, `{"Response": "FAILED", "ResponseMessage": "<why>"}`: 400 not an image or
corrupt (also an empty body, or multipart without `file`), 401 API key missing or wrong, 404, 405,
413 upload over Server.max_upload_bytes or image over Server.max_image_side pixels a side,
415 unsupported content type or image format (PNG, JPEG, BMP and TIFF are accepted), 503 no model,
500 only for a fault of the server itself (logged with its traceback, never sent to the client).

Any decodable image of an accepted format within the limits gets a prediction, whatever its
size (a 1x1 PNG is answered with a 200): the API does not judge whether it is a histology patch.

Uploads never touch the working directory: multipart files are kept in memory (bounded by
Server.max_upload_bytes), and the optional archive (Server.archive_dir, total size capped by
Server.archive_max_bytes, oldest deleted first) uses names made by the server, never the client's.
"""

from __future__ import annotations

import collections
import datetime
import errno
import hmac
import io
import json
import logging
import re
import ssl
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from flask import Blueprint, Flask, Request, current_app, g, jsonify, request
from PIL import Image
from werkzeug.exceptions import HTTPException, InternalServerError

from idc.core.config import Config
from idc.core.errors import ApiError, ImageError, ImageTooLargeError, ListenError, UnsupportedImageError
from idc.edge.identity import model_identity

if TYPE_CHECKING:
    from idc.edge.engine import Classifier

log = logging.getLogger(__name__)

INFER = "/api/infer"
HEALTH = "/api/health"
RAW_TYPES = ("application/octet-stream", "")  # plus any image/*; no Content-Type counts as raw bytes
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "TIFF": "tif"}
# Room above max_upload_bytes before waitress itself refuses a body: up to that, Flask answers the
# 413 (and logs and counts the request); above it waitress refuses it before reading it, with the
# same JSON 413 (_JsonErrorTask).
WAITRESS_BODY_SLACK = 1 << 20


def failed(status: int, message: str, headers=None):
    response = jsonify({"Response": "FAILED", "ResponseMessage": message})
    response.status_code = status
    response.headers.update(headers or {})
    return response


class InMemoryRequest(Request):
    """Multipart uploads stay in memory (their size is bounded by MAX_CONTENT_LENGTH); werkzeug
    would otherwise spool uploads over 500 KB into a temporary file."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


class UploadArchive:
    """A folder of accepted uploads, at most `max_bytes` in total: the oldest are deleted first.

    File names are made here (UTC time, random id, result), never taken from the client; only
    files named that way are counted or deleted, so nothing else in the folder is touched.
    """

    NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}Z_[0-9a-f]{12}_idc[01]_p\d\.\d{4}(_review)?\.(png|jpg|bmp|tif)$")

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Names start with the time, so name order is age order.
        existing = sorted(p for p in self.folder.iterdir() if p.is_file() and self.NAME.match(p.name))
        self._files = collections.deque((p, p.stat().st_size) for p in existing)
        self._total = sum(size for _, size in self._files)
        with self._lock:
            self._trim()

    @property
    def total_bytes(self) -> int:
        return self._total

    def add(self, data: bytes, image_format: str, label: int, p_idc: float, needs_review: bool) -> Path | None:
        """Store one upload; never raises (a full disk must not fail the request)."""
        if len(data) > self.max_bytes:
            log.warning("archive: a %d-byte upload is larger than archive_max_bytes; not archived", len(data))
            return None
        now = datetime.datetime.now(datetime.timezone.utc)
        name = (f"{now:%Y%m%dT%H%M%S.%f}Z_{uuid.uuid4().hex[:12]}_idc{label}_p{p_idc:.4f}"
                f"{'_review' if needs_review else ''}.{EXTENSIONS[image_format]}")
        path = self.folder / name
        try:
            with self._lock:
                with path.open("xb") as f:
                    f.write(data)
                self._files.append((path, len(data)))
                self._total += len(data)
                self._trim()
            return path
        except OSError as err:
            log.error("archive: cannot write %s: %s", path, err)
            return None

    def _trim(self) -> None:
        while self._total > self.max_bytes and self._files:
            oldest, size = self._files.popleft()
            self._total -= size
            oldest.unlink(missing_ok=True)


class ApiState:
    """What the request handlers share: the classifier, publisher, archive and counters."""

    def __init__(self, config: Config, classifier, publisher, owns_publisher: bool):
        server = config.Server
        self.config = config
        self.classifier = classifier
        self.identity = model_identity(classifier)  # hashes the model files: once, not per request
        self.publisher = publisher
        self.owns_publisher = owns_publisher
        self.max_side = server.max_image_side
        self._api_key = server.api_key.encode("utf-8") if server.api_key else None
        self.archive = (UploadArchive(config.resolve(server.archive_dir), server.archive_max_bytes)
                        if server.archive_dir else None)
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._counts = {"served": 0, "ok": 0, "failed": 0}

    @property
    def auth_required(self) -> bool:
        return self._api_key is not None

    def authorize(self, headers) -> None:
        """Raise 401 unless the request carries the API key (X-API-Key or Authorization: Bearer)."""
        if self._api_key is None:
            return
        given = headers.get("X-API-Key")
        if given is None:
            scheme, _, token = headers.get("Authorization", "").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else None
        # WSGI gives headers as latin-1 decoded strings: encoding them back gives the bytes sent
        # (so a UTF-8 key sent as UTF-8 matches), and nothing a client sends can raise here.
        if given is None or not hmac.compare_digest(given.encode("latin-1", "replace"), self._api_key):
            why = "API key required: send it as X-API-Key or Authorization: Bearer <key>" if given is None \
                else "wrong API key"
            raise ApiError(401, why, {"WWW-Authenticate": 'Bearer realm="idc"'})

    def count(self, ok: bool) -> None:
        with self._lock:
            self._counts["served"] += 1
            self._counts["ok" if ok else "failed"] += 1

    @property
    def counts(self) -> dict:
        """Requests to /api/infer: served, ok (200), failed (any error)."""
        with self._lock:
            return dict(self._counts)

    def mqtt_status(self) -> dict:
        try:
            return dict(self.publisher.status())
        except Exception:  # health must answer even if the publisher is broken
            log.exception("MQTT status unavailable")
            return {"enabled": getattr(self.publisher, "enabled", None), "error": "status unavailable"}

    def model_info(self) -> dict:
        if self.classifier is None:
            return {"loaded": False}
        described = self.classifier.describe()
        # What the model is and which decision rule applies; not the model's path on disk.
        return {"loaded": True, **{key: value for key, value in described.items() if key != "model"}}

    def close(self) -> None:
        """Stop the MQTT publisher if the app created it."""
        if self.owns_publisher:
            self.publisher.stop()


def image_format(data: bytes) -> str:
    """The format of an image already decoded successfully (read from its header only)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.format


# The shared decoder's error types, as HTTP statuses.
IMAGE_ERROR_STATUS = ((ImageTooLargeError, 413), (UnsupportedImageError, 415), (ImageError, 400))


def upload_bytes(req: Request) -> bytes:
    """The image bytes of a request: the raw body, or the multipart field `file`."""
    mimetype = req.mimetype
    if mimetype == "multipart/form-data":
        upload = req.files.get("file")
        if upload is None:
            raise ApiError(400, "multipart request without a 'file' field: send the image as the file "
                                "field 'file' (e.g. curl -F file=@patch.png)")
        return upload.read()
    if mimetype.startswith("image/") or mimetype in RAW_TYPES:
        return req.get_data(cache=False)
    raise ApiError(415, f"unsupported content type {mimetype!r}: send the image with an image/* or "
                        "application/octet-stream content type, or as multipart field 'file'")


bp = Blueprint("api", __name__)


def _state() -> ApiState:
    return current_app.extensions["idc"]


@bp.post(INFER)
def infer():
    state = _state()
    state.authorize(request.headers)
    if state.classifier is None:
        raise ApiError(503, "model not loaded: train and compile it (trainer.py, compile_ncs.sh), "
                            "then restart the server")
    data = upload_bytes(request)
    if not data:
        raise ApiError(400, "empty body: send the image bytes (PNG or JPEG), or a multipart field 'file'")
    try:
        prediction = state.classifier.classify(data)
    except ImageError as err:
        status = next(code for kind, code in IMAGE_ERROR_STATUS if isinstance(err, kind))
        raise ApiError(status, str(err)) from None
    g.prediction, g.upload = prediction, data  # the review station queues flagged uploads (idc.edge.station)
    try:
        state.publisher.publish_result(prediction.label, prediction.p_idc, prediction.needs_review)
    except Exception:  # the publisher never raises by contract; a broken one must not fail requests
        log.exception("MQTT: publishing the result failed")
    if state.archive is not None:
        state.archive.add(data, image_format(data), prediction.label, prediction.p_idc, prediction.needs_review)
    return {
        "Response": "OK",
        "ResponseMessage": prediction.message,
        "Results": prediction.label,
        "Confidence": float(prediction.p_idc),  # unrounded: consistent with Results at the threshold
        "NeedsReview": prediction.needs_review,
        "Seconds": round(prediction.seconds, 6),
    }


@bp.get(HEALTH)
def health():
    state = _state()
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
        **_station_health(state),
    }
    return body, 200 if model["loaded"] else 503


def _station_health(state: ApiState) -> dict:
    """The served model's identity and the review queue (idc.edge.identity, idc.edge.review)."""
    from idc.edge.review import review_status

    return {"identity": state.identity, "review": review_status()}


def create_app(config: Config, classifier: Classifier | None = None, publisher=None) -> Flask:
    """The Flask app serving `classifier` (None: not loaded, /api/infer answers 503).

    `publisher` receives every result (an idc.iot.mqtt.ResultPublisher or alike); when None, the
    app makes and starts its own from the config (it does nothing while IoTJumpWay.enabled is
    false), stopped by `app.extensions["idc"].close()`.
    """
    server = config.Server
    if server.api_key == "":
        log.warning("Server.api_key is an empty string: no API key is required")
    owns_publisher = publisher is None
    if publisher is None:
        from idc.iot.mqtt import ResultPublisher

        publisher = ResultPublisher(config).start()
    # Pillow's decompression-bomb guard (process-wide): warn above the largest accepted image and
    # refuse twice that before decoding. Only ever lowered here, never loosened.
    pixels = max(1, server.max_image_side) ** 2
    if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > pixels:
        Image.MAX_IMAGE_PIXELS = pixels

    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config.update(MAX_CONTENT_LENGTH=server.max_upload_bytes)
    app.json.sort_keys = False  # keep the contract's field order: Response first
    state = ApiState(config, classifier, publisher, owns_publisher)
    app.extensions["idc"] = state
    app.register_blueprint(bp)
    from idc.edge import station  # the pages, review queue, /api/infer/batch, /metrics

    station.init_app(app, state)

    @app.before_request
    def start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def log_request(response):
        latency_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        if request.path == INFER:
            state.count(response.status_code == 200)
        prediction = g.get("prediction")
        if prediction is not None:
            outcome = f"result={prediction.label} p={prediction.p_idc:.4f} review={prediction.needs_review}"
        elif response.status_code >= 400:
            outcome = f"error={g.get('error', response.status)!r}"
        else:
            outcome = "-"
        log.info("%s %s %s %d bytes=%d %s latency_ms=%.1f", request.remote_addr, request.method, request.path,
                 response.status_code, request.content_length or 0, outcome, latency_ms)
        return response

    @app.errorhandler(ApiError)
    def api_error(err: ApiError):
        g.error = err.message
        return failed(err.status, err.message, err.headers)

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        allowed = [m for m in getattr(err, "valid_methods", None) or () if m not in ("HEAD", "OPTIONS")]
        messages = {
            404: f"not found: {request.path} (the API is POST {INFER} and GET {HEALTH})",
            405: f"method {request.method} not allowed on {request.path}; use {' or '.join(allowed)}",
            413: f"upload too large: the limit is {server.max_upload_bytes} bytes",
        }
        g.error = messages.get(err.code, err.name)
        headers = {k: v for k, v in err.get_headers() if k.lower() != "content-type"}
        return failed(err.code or 500, g.error, headers)

    @app.errorhandler(InternalServerError)
    def server_error(err: InternalServerError):
        # Flask has logged the original exception with its traceback; the client gets one line.
        g.error = "internal server error"
        return failed(500, "internal server error: the fault is logged on the server")

    return app


# --- serving ---

def _json_error_channel(max_upload_bytes: int):
    """A waitress channel whose own error answers (a body over its limit, a malformed request) are
    the API's JSON errors instead of waitress's plain text."""
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    class JsonErrorTask(ErrorTask):
        def execute(self):
            error = self.request.error
            if error.code == 413:
                message = f"upload too large: the limit is {max_upload_bytes} bytes"
            else:
                message = f"{error.reason.lower()}: {error.body}"
            log.info("%s %s %s %d bytes=%d error=%r (refused before reading the body)", self.channel.addr[0],
                     self.request.command or "-", self.request.path or "-", error.code,
                     self.request.content_length, message)
            body = json.dumps({"Response": "FAILED", "ResponseMessage": message}).encode()
            self.status = f"{error.code} {error.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    return type("JsonErrorChannel", (HTTPChannel,), {"error_task_class": JsonErrorTask})


def create_waitress_server(app: Flask, config: Config, host: str | None = None, port: int | None = None):
    """A waitress server for `app` (not yet running: call .run()); host, port, threads from config.

    Bodies over max_upload_bytes + 1 MiB are refused by waitress itself, from the Content-Length
    header before the body is read (chunked bodies once that much has arrived), so a client cannot
    make the server buffer more than that; they get the same JSON 413 as smaller ones, which reach
    Flask's 413.

    Idle connections cannot starve the server: waitress stops accepting at `connection_limit`
    open connections, and a connection without a request in progress is closed after
    `idle_timeout` seconds of silence (checked every quarter of it). waitress's defaults (100
    connections, 120 s) let 100 idle sockets, from a broken client or a port scanner, silence
    the classifier for two minutes. poll() instead of select(): select cannot watch descriptors
    above 1023, which a high connection limit reaches.
    """
    import waitress

    server = config.Server
    sockets: dict = {}
    created = waitress.create_server(
        app,
        map=sockets,
        host=server.host if host is None else host,
        port=server.port if port is None else port,
        threads=server.threads,
        connection_limit=server.connection_limit,
        channel_timeout=server.idle_timeout,
        cleanup_interval=max(1, server.idle_timeout // 4),
        asyncore_use_poll=True,
        max_request_body_size=server.max_upload_bytes + WAITRESS_BODY_SLACK,
        ident="IDC-Classifier",
        clear_untrusted_proxy_headers=True,
    )
    channel = _json_error_channel(server.max_upload_bytes)
    for listener in list(sockets.values()):  # one per listening socket; nothing is accepted before .run()
        if isinstance(listener, waitress.server.BaseWSGIServer):
            listener.channel_class = channel
    return created


class _LazyHandshakeContext(ssl.SSLContext):
    """TLS handshakes happen in the request's own thread (on first read), not in the accept loop,
    where one slow client would stall every other connection."""

    def wrap_socket(self, sock, *args, **kwargs):
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def tls_context(config: Config) -> ssl.SSLContext:
    server = config.Server
    context = _LazyHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.resolve(server.tls_cert), config.resolve(server.tls_key))
    return context


def create_tls_server(app: Flask, config: Config, host: str | None = None, port: int | None = None):
    """werkzeug's threaded WSGI server with TLS (Server.tls_cert, Server.tls_key); .serve_forever()."""
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Handler(WSGIRequestHandler):
        timeout = 30  # seconds a client may stay silent (also bounds the TLS handshake)

        def log_request(self, code="-", size="-"):  # the app logs one line per request already
            pass

    server = config.Server
    return make_server(server.host if host is None else host, server.port if port is None else port,
                       app, threaded=True, request_handler=Handler, ssl_context=tls_context(config))


def serve(app: Flask, config: Config, host: str | None = None, port: int | None = None) -> None:
    """Serve `app` until KeyboardInterrupt/SystemExit (e.g. from a SIGTERM handler).

    Raises ListenError (one clear line) when the address cannot be bound, e.g. a port in use."""
    settings = config.Server
    address = f"{settings.host if host is None else host}:{settings.port if port is None else port}"
    try:
        server = (create_tls_server if settings.tls_cert else create_waitress_server)(app, config, host, port)
    except OSError as err:
        hint = (" (is another server.py running? stop it, or choose another --port / Server.port)"
                if err.errno == errno.EADDRINUSE else "")
        raise ListenError(f"cannot listen on {address}: {err.strerror or err}{hint}") from None
    if settings.tls_cert:
        log.warning("serving HTTPS with werkzeug's threaded server (waitress has no TLS); for a production "
                    "edge box put a TLS-terminating reverse proxy in front of waitress instead")
        log.info("serving on https://%s:%s (POST %s, GET %s)", *server.server_address[:2], INFER, HEALTH)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return
    log.info("serving on http://%s:%s with waitress, %d threads (POST %s, GET %s)",
             server.effective_host, server.effective_port, settings.threads, INFER, HEALTH)
    server.run()  # returns after KeyboardInterrupt/SystemExit, with the worker threads shut down
