#!/usr/bin/env python3
"""The edge server: classifies histology patches over HTTP (POST /api/infer, GET /api/health).

  python server.py                          # host, port, threads from confs.json (127.0.0.1:7455)
  python server.py --host 0.0.0.0 --port 8080 --precision INT8

Serves with waitress (HTTPS with werkzeug's threaded server when Server.tls_cert/tls_key are set;
see idc/api.py), publishes every result over MQTT when IoTJumpWay.enabled, stops cleanly on
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import signal

from idc import cli

log = logging.getLogger("server")


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # waitress and werkzeug both stop serving on it


def main() -> int:
    p = cli.parser(__doc__.strip().splitlines()[0])
    p.add_argument("--host", help="address to bind (default: Server.host)")
    p.add_argument("--port", type=int, help="TCP port (default: Server.port)")
    p.add_argument("--precision", choices=["FP32", "FP16", "INT8"], help="IR to serve (default: OpenVINO.precision)")
    p.add_argument("--keras", action="store_true", help="serve the TensorFlow model instead of the IR")
    args = p.parse_args()
    config = cli.setup(args)
    from idc.config import with_overrides

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        config = with_overrides(config, "Server", **overrides)
    from idc.api import create_app, serve
    from idc.inference import load_classifier
    from idc.mqtt import ResultPublisher

    classifier = load_classifier(config, args.precision, prefer_ir=not args.keras)
    described = classifier.describe()
    log.info("model: %s on %s (input %d px, threshold %.2f)", described["backend"], described.get("device", "?"),
             described["image_size"], described["threshold"])
    if config.Server.api_key:
        log.info("API key required (X-API-Key or Authorization: Bearer)")
    elif config.Server.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model "
                    "(set Server.api_key in confs.json)", config.Server.host)
    publisher = ResultPublisher(config).start()  # does nothing unless IoTJumpWay.enabled
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve(create_app(config, classifier, publisher), config)
    finally:
        log.info("stopping")
        publisher.stop()
    return 0


if __name__ == "__main__":
    cli.run(main)
