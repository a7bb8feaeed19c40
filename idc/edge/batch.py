"""`POST /api/infer/batch`: many patches in one request, as loose files or one zip of a patient.

Body: multipart with any number of files (fields `file` or `files`), each an image or a zip of
images (the Kaggle layout `<patient>/<class>/<patient>_idx5_x<X>_y<Y>_class<C>.png` or flat); or
a zip as the raw body (`application/zip`). The same limits and errors as /api/infer apply to the
request (401, 413 over Server.max_upload_bytes, 415, 503) and to each image (its own 400/413/415
entry in the list, the rest still classified). A zip is refused as a whole, with a clear 4xx, when
it is not a zip (400), holds a path that leaves the archive (absolute, `..`, a drive; 400), an
encrypted member (400), more than Server.batch_max_files images (413), or more than
Server.batch_max_unzipped_bytes once unpacked (413: a zip bomb is refused before anything is
inflated, from the sizes its directory declares, and reading stops at that budget anyway). Files
named `.*` and folders `__MACOSX` are skipped.

200 → `{"Response": "OK", "ResponseMessage": "...", "Model": {name, precision, hash, trained_at},
"Count": n, "Failed": k, "Seconds": s, "Results": [...]}`, where each result is /api/infer's
answer (`Response`, `ResponseMessage`, `Results`, `Confidence`, `NeedsReview`, `Seconds`) plus
`File`, `Patient`, `X`, `Y` (from a Kaggle patch name, else null) and `ReviewId` (its item in the
review queue, or null); a failed image is `{"File", "Response": "FAILED", "ResponseMessage",
"Status"}`. With `?images=1` each result also carries the image as a data: URL (the page draws
the mosaic of a zip with it). With `Accept: application/x-ndjson` the answer streams, one JSON
object a line: first the envelope without `Results` (plus `Files`, the names in order), then each
result as soon as its chunk of images is classified.

Slide context: when the model bundle has a slide-context rule (chosen on validation patients at
training) and patches carry slide coordinates, the patches of a patient inform each other: those
results also get `ContextConfidence` and `ContextResults` (the patch-alone fields are unchanged)
and the reply `SlideContext` (the rule; null when not applied). When streaming, that comes as one
last line, `{"Response": "OK", "SlideContext": rule, "Context": [{File, ContextConfidence,
ContextResults}]}`, since it needs every patch first.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import posixpath
import time
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

from flask import Blueprint, Response, current_app, g, request, stream_with_context
from werkzeug.exceptions import RequestEntityTooLarge

from idc.core.bundle import parse_patch_name
from idc.core.errors import ApiError, ImageError
from idc.core.context import with_context
from idc.core.metrics import decide
from idc.core.preprocessing import decode_image
from idc.edge.api import IMAGE_ERROR_STATUS, RAW_TYPES, image_format
from idc.edge.identity import identity_label
from idc.edge.review import MIME, QueueEntry, check_access, queue_predictions

log = logging.getLogger(__name__)

BATCH = "/api/infer/batch"
ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/x-zip")
CHUNK = 32  # images per inference call (batch 32 is the fastest here); streamed results arrive CHUNK at a time


@dataclass
class Upload:
    name: str
    data: bytes


def _is_zip(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def _unsafe(name: str) -> bool:
    path = name.replace("\\", "/")
    parts = PurePosixPath(path).parts
    return (path.startswith("/") or ".." in parts or (len(path) > 1 and path[1] == ":")
            or posixpath.normpath(path).startswith(".."))


def _skipped(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def unzip(data: bytes, label: str, max_files: int, max_bytes: int) -> list[Upload]:
    """The images of a zip, checked before anything is inflated (see the module doc)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = [info for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise ApiError(400, f"{label} is not a readable zip ({err})") from None
    for info in infos:
        if _unsafe(info.filename):
            raise ApiError(400, f"{label} holds a path outside the archive ({info.filename!r}): refused; "
                                "zip the patient's folder with relative names")
    infos = [info for info in infos if not _skipped(info.filename)]
    if len(infos) > max_files:
        raise ApiError(413, f"{label} holds {len(infos)} files; the limit is {max_files} a request "
                            "(Server.batch_max_files)")
    declared = sum(info.file_size for info in infos)
    if declared > max_bytes:
        raise ApiError(413, f"{label} unpacks to {declared} bytes; the limit is {max_bytes} "
                            "(Server.batch_max_unzipped_bytes): refused before unpacking (a zip bomb?)")
    uploads, budget = [], max_bytes
    for info in infos:
        if info.flag_bits & 0x1:
            raise ApiError(400, f"{label}: {info.filename} is encrypted; send an unencrypted zip")
        try:
            with archive.open(info) as member:
                content = member.read(budget + 1)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError, ValueError) as err:
            raise ApiError(400, f"{label}: cannot unpack {info.filename} ({err})") from None
        budget -= len(content)
        if budget < 0:
            raise ApiError(413, f"{label} unpacks to more than {max_bytes} bytes (Server.batch_max_unzipped_bytes)")
        uploads.append(Upload(info.filename, content))
    return uploads


def batch_uploads(max_files: int, max_bytes: int) -> list[Upload]:
    """The request's images: multipart files (zips expanded) or a raw zip body."""
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        try:
            files = request.files.getlist("file") + request.files.getlist("files")
        except RequestEntityTooLarge:
            if (request.content_length or 0) > (request.max_content_length or 0) or request.content_length is None:
                raise  # the body is over max_upload_bytes: the API's own 413
            raise ApiError(413, f"too many parts in the form; the limit is {max_files} files a request "
                                "(Server.batch_max_files)") from None
        if not files:
            raise ApiError(400, "multipart request without files: send them as fields 'file' "
                                "(e.g. curl -F file=@a.png -F file=@b.png, or -F file=@patient.zip)")
        raw = [Upload(f.filename or f"file{i + 1}", f.read()) for i, f in enumerate(files)]
    elif mimetype in ZIP_TYPES or mimetype in RAW_TYPES:
        raw = [Upload("upload.zip", request.get_data(cache=False))]
        if not _is_zip(raw[0].data):
            raise ApiError(400, "the body is not a zip: send a zip as the body, or the images as multipart "
                                "fields 'file'")
    else:
        raise ApiError(415, f"unsupported content type {mimetype!r}: send multipart fields 'file' "
                            "(images or zips) or a zip body (application/zip)")
    uploads: list[Upload] = []
    for upload in raw:
        if _is_zip(upload.data):
            uploads += unzip(upload.data, upload.name, max_files - len(uploads), max_bytes)
        else:
            uploads.append(upload)
        if len(uploads) > max_files:
            raise ApiError(413, f"more than {max_files} images in one request (Server.batch_max_files)")
    if not uploads:
        raise ApiError(400, "no images in the request (an empty zip?)")
    return uploads


def _coordinates(name: str) -> dict:
    patch = parse_patch_name(PurePosixPath(name)) if name else None
    return {"Patient": patch.patient, "X": patch.x, "Y": patch.y} if patch else {"Patient": None, "X": None,
                                                                                  "Y": None}


def classify_uploads(uploads: list[Upload], with_images: bool):
    """Yield one result dict per upload, in order, classifying CHUNK images per inference call."""
    app = current_app._get_current_object()
    state = app.extensions["idc"]
    classifier, metrics = state.classifier, app.extensions.get("idc_metrics")
    model = identity_label(state.identity)
    for start in range(0, len(uploads), CHUNK):
        chunk = uploads[start:start + CHUNK]
        decoded, results = [], [None] * len(chunk)
        for i, upload in enumerate(chunk):
            began = time.perf_counter()
            try:
                if not upload.data:
                    raise ImageError("empty file: no image data")
                decoded.append((i, decode_image(upload.data, state.max_side), time.perf_counter() - began))
            except ImageError as err:
                status = next(code for kind, code in IMAGE_ERROR_STATUS if isinstance(err, kind))
                results[i] = {"File": upload.name, "Response": "FAILED", "ResponseMessage": str(err), "Status": status}
        if decoded:
            began = time.perf_counter()
            probabilities = classifier.probabilities([image for _, image, _ in decoded])
            share = (time.perf_counter() - began) / len(decoded)
            entries, placed = [], []
            for (i, _, decode_seconds), p in zip(decoded, probabilities):
                p = float(p)
                label, review = decide(p, classifier.threshold, classifier.review_band)
                label, review, upload = int(label), bool(review), chunk[i]
                fmt = image_format(upload.data)
                seconds = decode_seconds + share
                if metrics is not None:
                    metrics.observe_inference(seconds, label, review)
                results[i] = {"File": upload.name, "Response": "OK",
                              "ResponseMessage": "IDC Detected!" if label else "IDC Not Detected!",
                              "Results": label, "Confidence": p, "NeedsReview": review,
                              "Seconds": round(seconds, 6), **_coordinates(upload.name), "ReviewId": None}
                if with_images:
                    results[i]["Image"] = (f"data:{MIME.get(fmt, 'application/octet-stream')};base64,"
                                           + base64.b64encode(upload.data).decode("ascii"))
                entries.append(QueueEntry(upload.data, fmt, p, label, review, upload.name, model))
                placed.append(i)
                _publish_and_archive(state, upload.data, fmt, label, p, review)
            for i, item_id in zip(placed, queue_predictions(entries)):
                results[i]["ReviewId"] = item_id
        yield from results


def apply_slide_context(classifier, results: list[dict]) -> dict | None:
    """The bundle's slide-context rule (idc.core.context) on the batch's patches that carry slide
    coordinates: each such result gains ContextConfidence and ContextResults. Returns the rule
    applied, or None (no rule in the bundle, or no patch with coordinates). Patch-alone fields stay."""
    rule = classifier.bundle.slide_context
    placed = [r for r in results if r.get("Response") == "OK" and r.get("Patient") is not None]
    if not rule or not placed:
        return None
    p = with_context([r["Patient"] for r in placed], [r["X"] for r in placed], [r["Y"] for r in placed],
                     [r["Confidence"] for r in placed], rule["radius"], rule["weight"])
    for result, p_context in zip(placed, p):
        result["ContextConfidence"], result["ContextResults"] = float(p_context), int(p_context >= rule["threshold"])
    return {key: rule[key] for key in ("radius", "weight", "threshold")}


def _publish_and_archive(state, data: bytes, fmt: str, label: int, p: float, review: bool) -> None:
    try:
        state.publisher.publish_result(label, p, review)
    except Exception:  # the publisher never raises by contract; a broken one must not fail requests
        log.exception("MQTT: publishing the result failed")
    if state.archive is not None:
        state.archive.add(data, fmt, label, p, review)


batch_bp = Blueprint("batch", __name__)


@batch_bp.post(BATCH)
def infer_batch():
    state = current_app.extensions["idc"]
    check_access(changes=True)
    if state.classifier is None:
        raise ApiError(503, "model not loaded: train and compile it (trainer.py, compile_ncs.sh), "
                            "then restart the server")
    server = state.config.Server
    uploads = batch_uploads(server.batch_max_files, server.batch_max_unzipped_bytes)
    with_images = request.args.get("images") in ("1", "true", "yes")
    started = time.perf_counter()
    identity = state.identity
    g.batch_size = len(uploads)
    if "application/x-ndjson" in request.headers.get("Accept", ""):
        def lines():
            head = {"Response": "OK", "ResponseMessage": f"classifying {len(uploads)} images", "Model": identity,
                    "Count": len(uploads), "Files": [upload.name for upload in uploads]}
            yield json.dumps(head) + "\n"
            results = []
            for result in classify_uploads(uploads, with_images):
                results.append({key: result.get(key) for key in ("File", "Response", "Patient", "X", "Y", "Confidence")})
                yield json.dumps(result) + "\n"
            rule = apply_slide_context(state.classifier, results)  # needs every patch: the last line
            if rule:
                context = [{key: r[key] for key in ("File", "ContextConfidence", "ContextResults")}
                           for r in results if "ContextConfidence" in r]
                yield json.dumps({"Response": "OK", "SlideContext": rule, "Context": context}) + "\n"

        return Response(stream_with_context(lines()), mimetype="application/x-ndjson",
                        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    results = list(classify_uploads(uploads, with_images))
    failed = sum(result["Response"] != "OK" for result in results)
    rule = apply_slide_context(state.classifier, results)
    return {"Response": "OK", "ResponseMessage": f"classified {len(results) - failed} of {len(results)} images",
            "Model": identity, "Count": len(results), "Failed": failed, "SlideContext": rule,
            "Seconds": round(time.perf_counter() - started, 6), "Results": results}


def init_app(app) -> None:
    app.register_blueprint(batch_bp)
    # Werkzeug counts form parts; allow a full batch (and a few plain fields) before its own 413.
    app.config["MAX_FORM_PARTS"] = max(app.config.get("MAX_FORM_PARTS", 1000),
                                       app.extensions["idc"].config.Server.batch_max_files + 16)
