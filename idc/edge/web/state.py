"""What the request handlers share: one `ServerState` per app, made by create_app.

Handlers reach it with `current_state()`; nothing else is kept in `app.extensions` or `flask.g`
(apart from the request's start time and outcome, for the request log line: idc.edge.web.app).
"""

from __future__ import annotations

import logging
import threading
import time

from flask import current_app

from idc.core.config import Config
from idc.core.errors import ReviewStoreError
from idc.edge.identity import identity_label, model_identity
from idc.edge.web.archive import UploadArchive
from idc.edge.web.metrics import ServerMetrics
from idc.edge.web.store import QueueWriter, ReviewStore, review_db_path

log = logging.getLogger(__name__)

EXTENSION = "idc"  # the app.extensions key holding the ServerState


class ServerState:
    """The classifier, the result publisher, the archive, the review queue, the slide worker, the
    metrics and the request counters of one app."""

    def __init__(self, config: Config, classifier, publisher, owns_publisher: bool):
        server = config.Server
        self.config = config
        self.classifier = classifier
        self.identity = model_identity(classifier)  # hashes the model files: once, not per request
        self.model_label = identity_label(self.identity)
        self.publisher = publisher
        self.owns_publisher = owns_publisher
        self.max_side = server.max_image_side
        self.api_key = server.api_key.encode("utf-8") if server.api_key else None
        self.archive = (UploadArchive(config.resolve(server.archive_dir), server.archive_max_bytes)
                        if server.archive_dir else None)
        self.review = ReviewStore(review_db_path(config))
        if self.review.path.exists():  # say so at start-up; requests then answer the same message
            try:
                self.review.check()
            except ReviewStoreError as err:
                log.error("review queue unavailable: %s", err)
        self.review_writer = QueueWriter(self.review)
        # The Slides page's worker (idc.edge.web.slides.SlideWorker): create_app makes it, since it needs the
        # review store made here and that module reads this one (current_state).
        self.slides = None
        self.metrics = ServerMetrics(self)
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._counts = {"served": 0, "ok": 0, "failed": 0}

    @property
    def auth_required(self) -> bool:
        return self.api_key is not None

    def count(self, ok: bool) -> None:
        with self._lock:
            self._counts["served"] += 1
            self._counts["ok" if ok else "failed"] += 1

    @property
    def counts(self) -> dict:
        """Requests to /api/infer: served, ok (200), failed (any error)."""
        with self._lock:
            return dict(self._counts)

    def reviews(self) -> ReviewStore:
        """The review store, once the patches already answered by /api/infer are written (read your writes)."""
        self.review_writer.flush()
        return self.review

    def review_counts(self) -> dict:
        """{"pending", "reviewed"}; ReviewStoreError when the store fails."""
        return self.reviews().counts()

    def review_status(self) -> dict:
        """For /api/health: the queue's counts, or the store's error."""
        try:
            return {"enabled": True, "database": str(self.review.path), **self.review_counts()}
        except ReviewStoreError as err:
            return {"enabled": True, "database": str(self.review.path), "error": str(err)}

    def slides_status(self) -> dict:
        """For /api/health: the slide worker's state (idc.edge.web.slides.SlideWorker.status)."""
        return {"enabled": False} if self.slides is None else {"enabled": True, **self.slides.status()}

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
        """Stop the slide worker, and the MQTT publisher if the app created it."""
        if self.slides is not None:
            self.slides.close()
        if self.owns_publisher:
            self.publisher.stop()


def current_state() -> ServerState:
    return current_app.extensions[EXTENSION]
