"""Prometheus metrics for `GET /metrics` (prometheus-client, text exposition format); no Flask here.

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

Each app has its own registry (tests build many apps).
"""

from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from idc.core.errors import ReviewStoreError

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
MQTT_METRICS = (
    ("idc_mqtt_queue_depth", "queued", GaugeMetricFamily, "Results waiting to be published"),
    ("idc_mqtt_in_flight", "in_flight", GaugeMetricFamily, "Results published, not yet acknowledged"),
    ("idc_mqtt_connected", "connected", GaugeMetricFamily, "1 when connected to the broker"),
    ("idc_mqtt_dropped", "dropped", CounterMetricFamily, "Results dropped (queue full or stale)"),
    ("idc_mqtt_published", "published", CounterMetricFamily, "Results acknowledged by the broker"),
)


class _LiveCollector:
    """Values read at scrape time from the server's state (idc.edge.web.state.ServerState): the
    review queue, the MQTT publisher, the model."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        state = self.state
        up = GaugeMetricFamily("idc_review_store_up", "1 when the review database answers, else 0")
        queue = GaugeMetricFamily("idc_review_queue_length", "Patches waiting for review")
        try:
            queue.add_metric([], state.review_counts()["pending"])
            up.add_metric([], 1)
        except ReviewStoreError as err:
            log.warning("metrics: %s", err)
            up.add_metric([], 0)
        yield queue
        yield up
        mqtt = state.mqtt_status()
        for name, key, kind, text in MQTT_METRICS:
            value = mqtt.get(key)
            if isinstance(value, (int, float)):
                yield kind(name, text, value=float(value))
        identity = state.identity
        info = GaugeMetricFamily("idc_model_info", "The model served (1)", labels=["name", "precision", "hash", "backend"])
        if identity:
            backend = getattr(state.classifier, "backend", "?")
            info.add_metric([identity["name"], identity["precision"], identity["hash"], backend], 1)
        yield info


class ServerMetrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, state):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("idc_http_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=registry)
        self.latency = Histogram("idc_http_request_duration_seconds", "Request latency by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.inference = Histogram("idc_inference_seconds", "Decode, preprocessing and inference time per image",
                                   buckets=INFERENCE_BUCKETS, registry=registry)
        self.images = Counter("idc_images_classified", "Images classified, by result", ["result"], registry=registry)
        self.flagged = Counter("idc_images_flagged", "Images flagged for human review", registry=registry)
        registry.register(_LiveCollector(state))

    def observe_inference(self, seconds: float, label: int, review: bool) -> None:
        self.inference.observe(seconds)
        self.images.labels("idc" if label else "no_idc").inc()
        if review:
            self.flagged.inc()

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
