"""The server's wire format: routes, JSON answers and errors, how an upload is read.

The HTTP contract itself (every endpoint, field and status) is written once, in docs/api.md.
Nothing here holds state or knows the app.
"""

from __future__ import annotations

import io

from flask import Request, jsonify
from PIL import Image

from idc.core.errors import ApiError, ImageError, ImageTooLargeError, UnsupportedImageError
from idc.core.files import FORMAT_NAMES, IMAGE_FORMATS

INFER = "/api/infer"
BATCH = "/api/infer/batch"
HEALTH = "/api/health"
METRICS = "/metrics"
SLIDES = "/api/slides"  # whole slides: idc.edge.web.slides
RAW_TYPES = ("application/octet-stream", "")  # plus any image/*; no Content-Type counts as raw bytes
ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/x-zip")
# The shared decoder's error types, as HTTP statuses (the first that matches).
IMAGE_ERROR_STATUS = ((ImageTooLargeError, 413), (UnsupportedImageError, 415), (ImageError, 400))
NO_MODEL = "model not loaded: train and compile it (trainer.py, compile_ncs.sh), then restart the server"


def failed(status: int, message: str, headers=None):
    """The JSON error answer: {"Response": "FAILED", "ResponseMessage": why}."""
    response = jsonify({"Response": "FAILED", "ResponseMessage": message})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def image_error(err: ImageError) -> ApiError:
    """A decoding error as the API's error with its status."""
    return ApiError(next(code for kind, code in IMAGE_ERROR_STATUS if isinstance(err, kind)), str(err))


def answer(prediction) -> dict:
    """/api/infer's fields for one prediction (idc.edge.engine.Prediction), in the contract's order."""
    return {
        "Response": "OK",
        "ResponseMessage": prediction.message,
        "Results": prediction.label,
        "Confidence": float(prediction.p_idc),  # unrounded: consistent with Results at the threshold
        "NeedsReview": prediction.needs_review,
        "Seconds": round(prediction.seconds, 6),
    }


class InMemoryRequest(Request):
    """Multipart uploads stay in memory (their size is bounded by MAX_CONTENT_LENGTH); werkzeug
    would otherwise spool uploads over 500 KB into a temporary file."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def image_format(data: bytes) -> str:
    """The format of an image already decoded successfully (read from its header only)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.format


def mime(image_format: str) -> str:
    spec = IMAGE_FORMATS.get(image_format)
    return spec.mime if spec else "application/octet-stream"


def upload_bytes(req: Request) -> tuple[bytes, str | None]:
    """The image bytes of a request and the file name it was sent with (multipart only): the raw
    body, or the multipart field `file`."""
    mimetype = req.mimetype
    if mimetype == "multipart/form-data":
        upload = req.files.get("file")
        if upload is None:
            raise ApiError(400, "multipart request without a 'file' field: send the image as the file "
                                "field 'file' (e.g. curl -F file=@patch.png)")
        return upload.read(), upload.filename
    if mimetype.startswith("image/") or mimetype in RAW_TYPES:
        return req.get_data(cache=False), None
    raise ApiError(415, f"unsupported content type {mimetype!r}: send the image with an image/* or "
                        "application/octet-stream content type, or as multipart field 'file'")


EMPTY_BODY = f"empty body: send the image bytes ({FORMAT_NAMES}), or a multipart field 'file'"
