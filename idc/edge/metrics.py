"""Prometheus metrics at `GET /metrics` (prometheus-client, text exposition format).

- `idc_http_requests_total{endpoint,method,status}`: every request, by route (the URL rule, so
  the label set stays small; `unmatched` for 404s).
- `idc_http_request_duration_seconds{endpoint}`: latency histogram (as logged per request).
- `idc_inference_seconds`: decode + preprocessing + inference per image (/api/infer and batches).
- `idc_images_classified_total{result}`: `idc`, `no_idc`; `idc_images_flagged_total` for review.
- `idc_review_queue_length`: items waiting for review (read from the store at scrape time);
  `idc_review_store_up` 0 when the store fails.
- `idc_mqtt_queue_depth`, `idc_mqtt_in_flight`, `idc_mqtt_dropped_total`, `idc_mqtt_published_total`,
  `idc_mqtt_connected`: the result publisher's counters.
- `idc_model_info{name,precision,hash,backend}` 1.

Each app has its own registry (tests build many apps). With Server.api_key set, /metrics needs the
key as well (Prometheus: `authorization: {credentials: KEY}` in the scrape config).
"""

from __future__ import annotations

import logging
import time

from flask import Blueprint, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from idc.core.errors import ReviewStoreError

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _LiveCollector:
    """Values read at scrape time: the review queue, the MQTT publisher, the model."""

    def __init__(self, app):
        self.app = app

    def collect(self):
        state = self.app.extensions["idc"]
        store = self.app.extensions.get("idc_review")
        up = GaugeMetricFamily("idc_review_store_up", "1 when the review database answers, else 0")
        queue = GaugeMetricFamily("idc_review_queue_length", "Patches waiting for review")
        if store is not None:
            from idc.edge.review import flush_writes

            flush_writes(self.app)
            try:
                queue.add_metric([], store.counts()["pending"])
                up.add_metric([], 1)
            except ReviewStoreError as err:
                log.warning("metrics: %s", err)
                up.add_metric([], 0)
        yield queue
        yield up
        mqtt = state.mqtt_status()
        for name, key, kind, text in (
                ("idc_mqtt_queue_depth", "queued", GaugeMetricFamily, "Results waiting to be published"),
                ("idc_mqtt_in_flight", "in_flight", GaugeMetricFamily, "Results published, not yet acknowledged"),
                ("idc_mqtt_connected", "connected", GaugeMetricFamily, "1 when connected to the broker"),
                ("idc_mqtt_dropped", "dropped", CounterMetricFamily, "Results dropped (queue full or stale)"),
                ("idc_mqtt_published", "published", CounterMetricFamily, "Results acknowledged by the broker")):
            value = mqtt.get(key)
            if isinstance(value, (int, float)):
                yield kind(name, text, value=float(value))
        identity = state.identity
        info = GaugeMetricFamily("idc_model_info", "The model served (1)", labels=["name", "precision", "hash", "backend"])
        if identity:
            info.add_metric([identity["name"], identity["precision"], identity["hash"], getattr(state.classifier, "backend", "?")], 1)
        yield info


class ServerMetrics:
    def __init__(self, app):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("idc_http_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=registry)
        self.latency = Histogram("idc_http_request_duration_seconds", "Request latency by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.inference = Histogram("idc_inference_seconds", "Decode, preprocessing and inference time per image",
                                   buckets=INFERENCE_BUCKETS, registry=registry)
        self.images = Counter("idc_images_classified", "Images classified, by result", ["result"], registry=registry)
        self.flagged = Counter("idc_images_flagged", "Images flagged for human review", registry=registry)
        registry.register(_LiveCollector(app))

    def observe_inference(self, seconds: float, label: int | None = None, review: bool | None = None) -> None:
        self.inference.observe(seconds)
        if label is not None:
            self.images.labels("idc" if label else "no_idc").inc()
        if review:
            self.flagged.inc()

    def after_request(self, response):
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        self.requests.labels(endpoint, request.method, str(response.status_code)).inc()
        self.latency.labels(endpoint).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        prediction = g.get("prediction")
        if prediction is not None:
            self.observe_inference(prediction.seconds, prediction.label, prediction.needs_review)
        return response


metrics_bp = Blueprint("metrics", __name__)


@metrics_bp.get("/metrics")
def metrics():
    from idc.edge.review import check_access

    check_access()
    registry = current_app.extensions["idc_metrics"].registry
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})


def init_app(app) -> ServerMetrics:
    server_metrics = ServerMetrics(app)
    app.extensions["idc_metrics"] = server_metrics
    app.after_request(server_metrics.after_request)
    app.register_blueprint(metrics_bp)
    return server_metrics
