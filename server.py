#!/usr/bin/env python3
"""The edge server: classifies histology patches over HTTP (POST /api/infer, GET /api/health).

  python server.py                          # host, port, threads from confs.json (127.0.0.1:7455)
  python server.py --host 0.0.0.0 --port 8080 --precision INT8

Serves with waitress (HTTPS with werkzeug's threaded server when Server.tls_cert/tls_key are set;
see idc/edge/web/serving.py), publishes every result over MQTT when IoTJumpWay.enabled, stops cleanly on
Ctrl-C or SIGTERM. Serving an IR needs no TensorFlow. The model is loaded and warmed up (a first
inference on every infer request) before the port is opened, so the first requests never race
the engine's initialisation.

Every request prints the 2018 article's console block on stdout (`-- Loading Sample`, `-- Loaded
Sample`, timings, `TASS Identified IDC with a confidence of ...`, the top-2 classes), and every
result the broker acknowledges `-- Published: N` / `-- Published to Device Sensors Channel`; the
log (stderr) is unchanged.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys

from idc.core import cli
from idc.core.bundle import PRECISIONS

log = logging.getLogger("server")
# After SIGTERM, waitress gives requests in flight 5 s to finish; whatever still runs after this
# many seconds is dumped (stack traces on stderr) and the process exits. The watchdog is a C
# thread of faulthandler's: it fires even if Python code is stuck holding the GIL.
STOP_DEADLINE_SECONDS = 15


def _interrupt(signum, frame):
    faulthandler.dump_traceback_later(STOP_DEADLINE_SECONDS, exit=True)
    raise KeyboardInterrupt  # waitress and werkzeug both stop serving on it


def main() -> int:
    p = cli.parser(__doc__.strip().splitlines()[0])
    p.add_argument("--host", help="address to bind (default: Server.host)")
    p.add_argument("--port", type=int, help="TCP port (default: Server.port)")
    p.add_argument("--precision", type=str.upper, choices=PRECISIONS, help="IR to serve (default: OpenVINO.precision; auto: INT8 on a CPU where compiled, else FP16)")
    p.add_argument("--keras", action="store_true", help="serve the TensorFlow model instead of the IR")
    cli.add_decision_rule_options(p)
    args = p.parse_args()
    config = cli.setup(args)
    from idc.core.config import with_overrides

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        config = with_overrides(config, "Server", **overrides)
    from idc.edge import console
    from idc.edge.web.app import create_app
    from idc.edge.web.serving import serve
    from idc.edge.engine import load_classifier
    from idc.iot.publisher import ResultPublisher

    classifier = load_classifier(config, "keras" if args.keras else args.precision, args.threshold, args.review_band)
    described = classifier.describe()
    log.info("model: %s %s on %s (input %d px, trained %s, data %s)", described["model_name"], described["backend"],
             described.get("device", "?"), described["image_size"], described["trained_at"],
             described["data_fingerprint"])
    log.info("decision rule: threshold %.4g, review band %.4g (%s)", classifier.threshold, classifier.review_band,
             classifier.rule_source)
    if config.Server.api_key:
        log.info("API key required (X-API-Key or Authorization: Bearer)")
    elif config.Server.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model "
                    "(set Server.api_key in confs.json)", config.Server.host)
    # Does nothing unless IoTJumpWay.enabled.
    publisher = ResultPublisher(config, on_published=console.published).start()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        serve(create_app(config, console.ConsoleClassifier(classifier), publisher), config)
    finally:
        log.info("stopping")
        publisher.stop()
        sys.stderr.flush()
    return 0


if __name__ == "__main__":
    cli.run(main)
