"""`POST /api/infer/batch`: many patches in one request, as loose files or one zip of a patient.

The contract (fields, limits, streaming, slide context) is in docs/api.md. A zip is checked
before anything is inflated: paths that leave the archive, encrypted members, too many files, or
more than Server.batch_max_unzipped_bytes declared are refused whole (zip bombs included).
"""

from __future__ import annotations

import base64
import io
import json
import posixpath
import time
import zipfile
from pathlib import PurePosixPath

from flask import Blueprint, Response, request, stream_with_context
from werkzeug.exceptions import RequestEntityTooLarge

from idc.core.bundle import parse_patch_name
from idc.core.context import apply_rule, rule_fields
from idc.core.errors import ApiError
from idc.edge.web import pipeline
from idc.edge.web.auth import check_access
from idc.edge.web.pipeline import Classified, Upload
from idc.edge.web.protocol import BATCH, RAW_TYPES, ZIP_TYPES, answer, mime
from idc.edge.web.state import current_state

bp = Blueprint("batch", __name__)


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


def _result(item, with_images: bool) -> dict:
    """One entry of the batch's Results: /api/infer's answer plus where the patch lies, or its error."""
    if not isinstance(item, Classified):
        return {"File": item.upload.name, "Response": "FAILED", "ResponseMessage": item.error.message,
                "Status": item.error.status}
    result = {"File": item.upload.name, **answer(item.prediction), **_coordinates(item.upload.name),
              "ReviewId": item.review_id}
    if with_images:
        result["Image"] = f"data:{mime(item.format)};base64," + base64.b64encode(item.upload.data).decode("ascii")
    return result


def apply_slide_context(classifier, results: list[dict]) -> dict | None:
    """The bundle's slide-context rule (idc.core.context) on the batch's patches that carry slide
    coordinates: each such result gains ContextConfidence and ContextResults. Returns the rule
    applied, or None (no rule in the bundle, or no patch with coordinates). Patch-alone fields stay."""
    rule = classifier.bundle.slide_context
    placed = [r for r in results if r.get("Response") == "OK" and r.get("Patient") is not None]
    if not rule or not placed:
        return None
    p = apply_rule(rule, [r["Patient"] for r in placed], [r["X"] for r in placed], [r["Y"] for r in placed],
                   [r["Confidence"] for r in placed])
    for result, p_context in zip(placed, p):
        result["ContextConfidence"], result["ContextResults"] = float(p_context), int(p_context >= rule["threshold"])
    return rule_fields(rule)


@bp.post(BATCH)
def infer_batch():
    state = current_state()
    check_access(changes=True)
    pipeline.require_model(state)
    server = state.config.Server
    uploads = batch_uploads(server.batch_max_files, server.batch_max_unzipped_bytes)
    with_images = request.args.get("images") in ("1", "true", "yes")
    started = time.perf_counter()
    results = (_result(item, with_images) for item in pipeline.classify_many(state, uploads))
    if "application/x-ndjson" in request.headers.get("Accept", ""):
        def lines():
            head = {"Response": "OK", "ResponseMessage": f"classifying {len(uploads)} images", "Model": state.identity,
                    "Count": len(uploads), "Files": [upload.name for upload in uploads]}
            yield json.dumps(head) + "\n"
            kept = []
            for result in results:
                kept.append({key: result.get(key) for key in ("File", "Response", "Patient", "X", "Y", "Confidence")})
                yield json.dumps(result) + "\n"
            rule = apply_slide_context(state.classifier, kept)  # needs every patch: the last line
            if rule:
                context = [{key: r[key] for key in ("File", "ContextConfidence", "ContextResults")}
                           for r in kept if "ContextConfidence" in r]
                yield json.dumps({"Response": "OK", "SlideContext": rule, "Context": context}) + "\n"

        return Response(stream_with_context(lines()), mimetype="application/x-ndjson",
                        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    results = list(results)
    failed = sum(result["Response"] != "OK" for result in results)
    rule = apply_slide_context(state.classifier, results)
    return {"Response": "OK", "ResponseMessage": f"classified {len(results) - failed} of {len(results)} images",
            "Model": state.identity, "Count": len(results), "Failed": failed, "SlideContext": rule,
            "Seconds": round(time.perf_counter() - started, 6), "Results": results}
