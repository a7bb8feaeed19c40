"""The one request pipeline: decode -> classify -> decide -> publish / archive / queue / count.

`/api/infer` runs it on one upload (`classify_one`), `/api/infer/batch` on many (`classify_many`,
CHUNK images per inference call); both deliver every answer the same way (`_deliver`): counted in
the metrics, published over MQTT, archived when Server.archive_dir is set, and queued for review
when the rule says so (Server.review_all_idc, the review band).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

from idc.core.errors import ApiError, ImageError, ReviewStoreError
from idc.core.preprocessing import decode_image
from idc.edge.engine import Prediction
from idc.edge.web.protocol import NO_MODEL, image_error, image_format
from idc.edge.web.state import ServerState
from idc.edge.web.store import QueueEntry, wants_review

log = logging.getLogger(__name__)

CHUNK = 32  # images per inference call (batch 32 is the fastest here); streamed results arrive CHUNK at a time


@dataclass(frozen=True)
class Upload:
    name: str | None  # the name it was sent with (a multipart file or a zip member), if any
    data: bytes


@dataclass(frozen=True)
class Classified:
    upload: Upload
    format: str  # PNG, JPEG, BMP, TIFF
    prediction: Prediction
    review_id: int | None = None  # its item in the review queue (batches only: /api/infer queues later)


@dataclass(frozen=True)
class Refused:
    upload: Upload
    error: ApiError  # why this one image got no answer (its 400/413/415)


def require_model(state: ServerState) -> None:
    if state.classifier is None:
        raise ApiError(503, NO_MODEL)


def classify_one(state: ServerState, upload: Upload) -> Classified:
    """One image: its answer, or ApiError (400/413/415) when it cannot be decoded."""
    try:
        prediction = state.classifier.classify(upload.data)
    except ImageError as err:
        raise image_error(err) from None
    (classified,) = _deliver(state, [Classified(upload, image_format(upload.data), prediction)], wait_for_ids=False)
    return classified


def classify_many(state: ServerState, uploads: list[Upload]) -> Iterator[Classified | Refused]:
    """One answer per upload, in order, classifying CHUNK images per inference call."""
    for start in range(0, len(uploads), CHUNK):
        chunk = uploads[start:start + CHUNK]
        answers: list[Classified | Refused | None] = [None] * len(chunk)
        decoded = []  # (index in chunk, image, decode seconds)
        for i, upload in enumerate(chunk):
            began = time.perf_counter()
            try:
                decoded.append((i, decode_image(upload.data, state.max_side), time.perf_counter() - began))
            except ImageError as err:
                answers[i] = Refused(upload, image_error(err))
        if decoded:
            predictions = state.classifier.predict([image for _, image, _ in decoded])
            classified = [Classified(chunk[i], image_format(chunk[i].data),
                                     replace(prediction, seconds=prediction.seconds + decode_seconds))
                          for (i, _, decode_seconds), prediction in zip(decoded, predictions)]
            for (i, _, _), item in zip(decoded, _deliver(state, classified, wait_for_ids=True)):
                answers[i] = item
        yield from answers


def _deliver(state: ServerState, items: list[Classified], wait_for_ids: bool) -> list[Classified]:
    """Count, publish and archive each answer, and queue those the rule sends to review: at once,
    returning their item ids (`wait_for_ids`), or from the background writer (a single image never
    waits for SQLite)."""
    review_all_idc = state.config.Server.review_all_idc
    to_review = []
    for index, item in enumerate(items):
        p = item.prediction
        state.metrics.observe_inference(p.seconds, p.label, p.needs_review)
        try:
            state.publisher.publish_result(p.label, p.p_idc, p.needs_review)
        except Exception:  # the publisher never raises by contract; a broken one must not fail requests
            log.exception("MQTT: publishing the result failed")
        if state.archive is not None:
            state.archive.add(item.upload.data, item.format, p.label, p.p_idc, p.needs_review)
        if wants_review(p.label, p.needs_review, review_all_idc):
            to_review.append((index, QueueEntry(item.upload.data, item.format, p.p_idc, p.label, p.needs_review,
                                                item.upload.name, state.model_label)))
    if not wait_for_ids:
        for _, entry in to_review:
            state.review_writer.submit(entry)
        return items
    items = list(items)
    if to_review:
        try:  # after the patches /api/infer answered before: ids in the order answered
            ids = state.reviews().add([entry for _, entry in to_review])
        except ReviewStoreError as err:  # a broken store must not fail classification
            log.error("review queue: %s", err)
        else:
            for (index, _), item_id in zip(to_review, ids):
                items[index] = replace(items[index], review_id=item_id)
    return items
