"""The HTTP API's contract for the edge tests (a support module, imported by test_server.py and
test_review_station.py): the answer's keys, test images, multipart bodies, a publisher that records
results, and the assertions on an answer and on a failure."""

import io

from PIL import Image

CONTRACT = {"Response", "ResponseMessage", "Results", "Confidence", "NeedsReview", "Seconds"}


def image_bytes(size=(50, 50), colour=(200, 120, 180), fmt="PNG", mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 0).save(out, fmt)
    return out.getvalue()


def multipart(fields: dict) -> tuple[bytes, str]:
    """A multipart/form-data body; a value (filename, bytes) is a file, bytes a plain field."""
    boundary = "----idc-test-boundary"
    parts = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            filename, data = value
            head = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n' \
                   "Content-Type: application/octet-stream\r\n\r\n"
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"\r\n\r\n', value
        parts.append(f"--{boundary}\r\n{head}".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class FakePublisher:
    """Records results; `fail=True` makes publish_result raise (a broken publisher)."""

    enabled = True

    def __init__(self, fail=False):
        self.results, self.fail = [], fail

    def publish_result(self, results, confidence, needs_review):
        if self.fail:
            raise RuntimeError("broker exploded")
        self.results.append((results, confidence, needs_review))
        return True

    def status(self):
        return {"enabled": True, "connected": True, "dropped": 7, "published": len(self.results),
                "queued": 0, "in_flight": 0}


def assert_failed(response, status, says=None):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["Response"] == "FAILED" and isinstance(body["ResponseMessage"], str) and body["ResponseMessage"]
    assert set(body) == {"Response", "ResponseMessage"}
    if says:
        assert says in body["ResponseMessage"], body
    return body


def assert_answer(body, label, threshold=0.54):
    assert set(body) == CONTRACT, body
    assert body["Response"] == "OK" and body["Results"] == label
    assert body["ResponseMessage"] == ("IDC Detected!" if label else "IDC Not Detected!")
    assert 0.0 <= body["Confidence"] <= 1.0 and (body["Confidence"] >= threshold) == bool(label)
    assert isinstance(body["NeedsReview"], bool) and body["Seconds"] >= 0
