"""Running the app: waitress for plain HTTP (the production server), or, when Server.tls_cert and
Server.tls_key are set, werkzeug's threaded server with TLS (waitress has no TLS). For an edge box
reachable from outside a lab network, prefer a TLS-terminating reverse proxy (nginx, Caddy) in
front of the waitress server and leave tls_cert/tls_key unset.
"""

from __future__ import annotations

import errno
import json
import logging
import ssl

from flask import Flask

from idc.core.config import Config
from idc.core.errors import ListenError
from idc.edge.web.protocol import HEALTH, INFER, SLIDES

log = logging.getLogger(__name__)

# Room above max_upload_bytes before waitress itself refuses a body: up to that, Flask answers the
# 413 (and logs and counts the request); above it waitress refuses it before reading it, with the
# same JSON 413 (the channel of _json_error_channel).
WAITRESS_BODY_SLACK = 1 << 20


def _is_slide_upload(request) -> bool:
    return request.command == "POST" and request.path == SLIDES


def _json_error_channel(max_upload_bytes: int, max_slide_bytes: int):
    """A waitress channel whose own error answers (a body over its limit, a malformed request) are
    the API's JSON errors instead of waitress's plain text, and whose body limit is the slides' own
    (Slides.max_upload_bytes) for POST /api/slides alone: slides are gigabytes, patches kilobytes.
    waitress spools a large body to a temporary file, not to memory, before the app reads it."""
    import copy

    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser
    from waitress.task import ErrorTask

    class SlideUploadParser(HTTPRequestParser):
        def parse_header(self, header_plus):
            super().parse_header(header_plus)
            if _is_slide_upload(self):  # before received() compares the body with the limit
                self.adj = copy.copy(self.adj)
                self.adj.max_request_body_size = max_slide_bytes + WAITRESS_BODY_SLACK

    class JsonErrorTask(ErrorTask):
        def execute(self):
            error = self.request.error
            if error.code == 413 and _is_slide_upload(self.request):
                message = f"slide too large: the limit is {max_slide_bytes} bytes (Slides.max_upload_bytes)"
            elif error.code == 413:
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

    return type("JsonErrorChannel", (HTTPChannel,), {"error_task_class": JsonErrorTask,
                                                      "parser_class": SlideUploadParser})


def create_waitress_server(app: Flask, config: Config, host: str | None = None, port: int | None = None):
    """A waitress server for `app` (not yet running: call .run()); host, port, threads from config.

    Bodies over max_upload_bytes + 1 MiB (Slides.max_upload_bytes + 1 MiB for a slide upload) are refused by waitress itself, from the Content-Length
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
    channel = _json_error_channel(server.max_upload_bytes, config.Slides.max_upload_bytes)
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
