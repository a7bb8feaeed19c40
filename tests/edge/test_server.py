"""The HTTP API (idc.edge.web, server.py): Flask's test client, and real waitress servers on 127.0.0.1."""

import io
import json
import logging
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import numpy as np
import pytest
import requests
from PIL import Image

from idc.edge.web.app import create_app
from idc.edge.web.archive import UploadArchive
from idc.edge.web.serving import create_tls_server
from idc.iot.publisher import ResultPublisher
from tests.edge.http_api import CONTRACT, FakePublisher, assert_answer, assert_failed, image_bytes, multipart
from tests.paths import ROOT
from tests.mosquitto import Probe, free_port, wait_until

SERVER_TOPIC = "IDC/Devices/Lab/EdgeServer"


# --- test images ---

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header says width x height (8-bit grey), with `idat` as its compressed pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + (png_chunk(b"IDAT", idat) if idat else b"")
            + png_chunk(b"IEND", b""))


def decompression_bomb(side: int = 6000) -> bytes:
    """A real, valid PNG of side x side black pixels: ~36 MB of pixels in ~35 KB."""
    return png_claiming(side, side, zlib.compress(bytes((side + 1) * side), 9))


def tiff_with_overflowing_strip_offset() -> bytes:
    """A white TIFF whose StripOffsets entry claims type LONG8: Pillow reads 0xFF..FF as an offset and
    raises OverflowError while decoding (not one of the errors idc.core.preprocessing.decode_image maps)."""
    out = io.BytesIO()
    Image.new("RGB", (50, 50), (255, 255, 255)).save(out, "TIFF")
    tiff = bytearray(out.getvalue())
    for i in range(struct.unpack_from("<H", tiff, 8)[0]):
        if struct.unpack_from("<H", tiff, 10 + 12 * i)[0] == 273:  # StripOffsets
            struct.pack_into("<H", tiff, 10 + 12 * i + 2, 16)  # LONG -> LONG8
    return bytes(tiff)


# --- fixtures ---

@pytest.fixture(scope="module")
def images(tiny_project):
    config, _ = tiny_project
    test = config.model_dir / "test"
    return {"positive": (test / "positive.png").read_bytes(), "negative": (test / "negative.png").read_bytes()}


@pytest.fixture
def publisher():
    return FakePublisher()


@pytest.fixture
def app_for(make_config, tiny_classifier, publisher):
    """app_for(classifier=tiny, **Server keys) -> a Flask app with the tiny FP16 model."""
    def make(classifier=tiny_classifier, publisher=publisher, **server):
        return create_app(make_config(Server=server), classifier, publisher)

    return make


@pytest.fixture
def client(app_for):
    return app_for().test_client()


def post(client, data, content_type="image/png", **headers):
    return client.post("/api/infer", data=data, headers={"Content-Type": content_type, **headers})


# --- the contract, through Flask's test client ---

def test_positive_and_negative_test_images(client, images, tiny_classifier, publisher):
    for name, label in (("positive", 1), ("negative", 0)):
        response = post(client, images[name])
        assert response.status_code == 200 and response.mimetype == "application/json"
        body = response.get_json()
        assert_answer(body, label)
        expected = tiny_classifier.classify(images[name])
        assert body["Confidence"] == pytest.approx(expected.p_idc, abs=1e-5)
        assert body["NeedsReview"] is expected.needs_review
        assert list(body)[:2] == ["Response", "ResponseMessage"]  # the article's field order
    # Sensors for every result, Warnings on IDC: the publisher gets both results, in order.
    assert [r[0] for r in publisher.results] == [1, 0]


@pytest.mark.parametrize("content_type", ["image/png", "image/jpeg", "image/x-anything", "application/octet-stream",
                                          "image/png; charset=binary", None])
def test_raw_body_content_types(client, images, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = client.post("/api/infer", data=images["positive"], headers=headers)
    assert response.status_code == 200, response.get_json()
    assert_answer(response.get_json(), 1)


def test_multipart_field_file(client, images):
    body, content_type = multipart({"note": b"hello", "file": ("positive.png", images["positive"])})
    response = post(client, body, content_type)
    assert response.status_code == 200
    assert_answer(response.get_json(), 1)


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "TIFF"])
def test_other_accepted_formats(client, images, fmt):
    out = io.BytesIO()
    options = {"quality": 95} if fmt == "JPEG" else {}
    Image.open(io.BytesIO(images["negative"])).convert("RGB").save(out, fmt, **options)
    response = post(client, out.getvalue(), "application/octet-stream")
    assert response.status_code == 200
    assert_answer(response.get_json(), 0)


def test_one_pixel_png_is_a_valid_image(client):
    # Decided: any decodable image of an accepted format within the limits gets a prediction.
    response = post(client, image_bytes((1, 1)))
    assert response.status_code == 200 and response.get_json()["Response"] == "OK"


# --- every error status ---

@pytest.mark.parametrize("data, says", [
    (b"", "empty body"),
    (b"hello, I am not an image", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + bytes(40), None),
    (None, "corrupt"),  # a truncated PNG, built in the test
    (tiff_with_overflowing_strip_offset(), "corrupt image data: OverflowError"),
])
def test_400_not_an_image_or_corrupt(client, images, data, says):
    data = images["positive"][: len(images["positive"]) // 2] if data is None else data
    assert_failed(post(client, data), 400, says)


def test_400_multipart_without_file(client, images):
    for fields in ({"image": ("x.png", images["positive"])}, {"file": images["positive"]}, {}):
        body, content_type = multipart(fields)
        assert_failed(post(client, body, content_type), 400, "'file'")
    assert_failed(post(client, b"--garbage--", "multipart/form-data; boundary=nope"), 400, "'file'")


def test_413_upload_too_large(app_for, images):
    client = app_for(max_upload_bytes=1000).test_client()
    assert_failed(post(client, bytes(1001)), 413, "1000 bytes")
    body, content_type = multipart({"file": ("big.png", bytes(2000))})
    assert_failed(post(client, body, content_type), 413, "1000 bytes")


@pytest.mark.parametrize("data", [png_claiming(20000, 20000), decompression_bomb(), image_bytes((5000, 8), mode="L")])
def test_413_image_too_large(client, data):
    assert_failed(post(client, data), 413, "4096 px")


def test_pillow_bomb_guard_is_set(client):
    assert Image.MAX_IMAGE_PIXELS <= 4096 ** 2


@pytest.mark.parametrize("data, content_type, says", [
    (None, "text/plain", "content type 'text/plain'"),
    (None, "application/json", "content type"),
    (None, "application/x-www-form-urlencoded", "content type"),
    (image_bytes(fmt="GIF", mode="P"), "image/gif", "format GIF"),
    (image_bytes(fmt="WEBP"), "image/webp", "format WEBP"),
    (image_bytes(fmt="ICO"), "application/octet-stream", "format ICO"),
])
def test_415_unsupported_type_or_format(client, images, data, content_type, says):
    assert_failed(post(client, images["positive"] if data is None else data, content_type), 415, says)


def test_503_model_not_loaded(make_config, images):
    app = create_app(make_config())  # no classifier, and its own (disabled) MQTT publisher
    try:
        client = app.test_client()
        assert_failed(post(client, images["positive"]), 503, "model not loaded")
        health = client.get("/api/health")
        assert health.status_code == 503 and health.get_json()["model"] == {"loaded": False}
        assert health.get_json()["mqtt"]["enabled"] is False
    finally:
        app.extensions["idc"].close()


def test_404_and_405_are_json(client):
    assert_failed(client.get("/nowhere"), 404, "/api/infer")
    response = client.get("/api/infer")
    assert_failed(response, 405, "method GET not allowed on /api/infer; use POST")
    assert "POST" in response.headers["Allow"]
    assert_failed(client.post("/api/health"), 405, "use GET")


def test_500_is_json_without_details_and_logged(app_for, images, caplog):
    class Broken:
        def classify(self, data):
            raise RuntimeError("secret internal detail")

        def describe(self):
            return {"backend": "broken", "image_size": 75, "threshold": 0.54}

    client = app_for(classifier=Broken()).test_client()
    response = post(client, images["positive"])
    body = assert_failed(response, 500, "internal server error")
    assert "secret" not in response.get_data(as_text=True) and "Traceback" not in response.get_data(as_text=True)
    logged = [r for r in caplog.records if r.exc_info and "secret internal detail" in str(r.exc_info[1])]
    assert logged, "the exception was not logged"
    assert body["ResponseMessage"]


def test_broken_publisher_does_not_fail_requests(app_for, images):
    client = app_for(publisher=FakePublisher(fail=True)).test_client()
    assert post(client, images["positive"]).status_code == 200


# --- security: API key, uploads kept off the disk, archive ---

KEY = "s3cret-key-for-tests"


@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    ({"X-API-Key": "wrong"}, 401),
    ({"X-API-Key": ""}, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"Authorization": f"Basic {KEY}"}, 401),
    ({"X-API-Key": "clé-ü"}, 401),  # non-ASCII: a 401, not a 500
    ({"X-API-Key": KEY}, 200),
    ({"Authorization": f"Bearer {KEY}"}, 200),
    ({"Authorization": f"bearer {KEY}"}, 200),
])
def test_api_key(app_for, images, headers, status):
    client = app_for(api_key=KEY).test_client()
    response = post(client, images["positive"], **headers)
    assert response.status_code == status
    if status == 401:
        assert_failed(response, 401)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_api_key_off_needs_no_header(client, images):
    assert post(client, images["positive"], **{"X-API-Key": "anything"}).status_code == 200


def test_health_stays_open_and_does_not_leak_the_key(app_for):
    client = app_for(api_key=KEY).test_client()
    response = client.get("/api/health")
    assert response.status_code == 200 and KEY not in response.get_data(as_text=True)
    assert response.get_json()["auth_required"] is True


def test_uploads_never_touch_the_working_directory_or_temp(app_for, images, tmp_path, monkeypatch):
    cwd, temp = tmp_path / "cwd", tmp_path / "temp"
    cwd.mkdir()
    temp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    spooled = []  # on Linux a TemporaryFile has no name: record its creation instead (werkzeug's spooling)
    real_temporary_file = tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda *a, **k: spooled.append(1) or real_temporary_file(*a, **k))
    client = app_for().test_client()
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8))
    big = io.BytesIO()
    noise.save(big, "PNG")
    assert big.tell() > 600_000  # werkzeug would spool a multipart file this big into a temp file
    for data in (big.getvalue(), images["positive"]):
        body, content_type = multipart({"file": ("../../evil.png", data)})
        assert post(client, body, content_type).status_code == 200
        assert post(client, data).status_code == 200
    assert list(cwd.iterdir()) == [] and list(temp.iterdir()) == [] and spooled == []


def test_archive_names_by_server_capped_oldest_first(app_for, images, tmp_path):
    size = len(images["positive"])
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "notes.txt").write_text("not ours: never counted nor deleted")
    client = app_for(archive_dir="archive", archive_max_bytes=3 * size + 10).test_client()  # relative: config folder
    for _ in range(5):
        body, content_type = multipart({"file": ("../../evil.png", images["positive"])})
        assert post(client, body, content_type).status_code == 200
    assert post(client, images["negative"]).status_code == 200
    post(client, b"garbage")  # refused uploads are not archived
    kept = sorted(p.name for p in archive.iterdir() if p.name != "notes.txt")
    assert (archive / "notes.txt").exists() and not list(tmp_path.rglob("evil*"))
    assert all(UploadArchive.NAME.match(name) for name in kept), kept
    total = sum((archive / name).stat().st_size for name in kept)
    assert total <= 3 * size + 10 and len(kept) >= 2
    assert "_idc0_" in kept[-1] and all("_idc1_" in name for name in kept[:-1])  # the newest kept, oldest gone
    # A restarted server picks the archive up again and keeps enforcing the cap.
    again = UploadArchive(archive, max_bytes=size + 1)
    assert again.total_bytes <= size + 1 and (archive / "notes.txt").exists()


# --- health and logging ---

def test_health_reports_model_mqtt_and_counters(app_for, images):
    client = app_for().test_client()
    post(client, images["positive"])
    post(client, images["negative"])
    post(client, b"nope")
    response = client.get("/api/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["Response"] == "OK"
    model = body["model"]
    assert {k: model[k] for k in ("loaded", "backend", "device", "precision", "image_size", "threshold",
                                  "review_band", "decision_rule", "model_name")} == {
        "loaded": True, "backend": "openvino-FP16", "device": "CPU", "precision": "FP16", "image_size": 75,
        "threshold": 0.54, "review_band": 0.1, "decision_rule": "model.json", "model_name": "DevCloudIDC"}
    assert len(model["data_fingerprint"]) == 12 and model["trained_at"] and "model" not in model
    assert body["mqtt"]["connected"] is True and body["mqtt"]["dropped"] == 7
    assert body["requests"] == {"served": 3, "ok": 2, "failed": 1}
    assert 0 <= body["uptime_seconds"] < 600 and body["auth_required"] is False


def test_one_log_line_per_request(client, images, caplog):
    caplog.set_level(logging.INFO, logger="idc.edge.web.app")
    post(client, images["positive"])
    post(client, b"nope")
    lines = [r.getMessage() for r in caplog.records if r.name == "idc.edge.web.app"]
    assert len(lines) == 2, lines
    assert f"POST /api/infer 200 bytes={len(images['positive'])} result=1 p=" in lines[0]
    assert "latency_ms=" in lines[0] and "POST /api/infer 400 bytes=4 error=" in lines[1]


# --- a real waitress server ---

@pytest.fixture
def waitress_url(live_server, app_for):
    def start(**server):
        app = app_for(**server)
        return live_server(app, app.extensions["idc"].config)

    return start


def test_waitress_serves_the_contract(waitress_url, images):
    url = waitress_url()
    with requests.Session() as session:
        for name, label in (("positive", 1), ("negative", 0)):
            response = session.post(f"{url}/api/infer", data=images[name], headers={"Content-Type": "image/png"},
                                    timeout=10)
            assert response.status_code == 200
            assert_answer(response.json(), label)
        response = session.post(f"{url}/api/infer", files={"file": ("p.png", images["positive"], "image/png")},
                                timeout=10)
        assert_answer(response.json(), 1)
        health = session.get(f"{url}/api/health", timeout=10)
        assert health.status_code == 200 and health.json()["requests"]["ok"] == 3


def test_waitress_chunked_uploads_and_body_limits(waitress_url, images):
    url = waitress_url(max_upload_bytes=100_000) + "/api/infer"
    data = images["positive"]
    chunks = lambda data: (data[i:i + 100] for i in range(0, len(data), 100))  # noqa: E731
    response = requests.post(url, data=chunks(data), headers={"Content-Type": "image/png"}, timeout=10)
    assert response.status_code == 200 and response.json()["Results"] == 1
    response = requests.post(url, data=chunks(bytes(150_000)), headers={"Content-Type": "image/png"}, timeout=10)
    assert response.status_code == 413 and response.json()["Response"] == "FAILED"
    response = requests.post(url, data=bytes(100_001), headers={"Content-Type": "image/png"}, timeout=10)
    assert response.status_code == 413 and response.json()["Response"] == "FAILED"
    # Far over the limit, waitress refuses the body itself, before buffering it all: the same JSON 413.
    response = requests.post(url, data=bytes(3 << 20), headers={"Content-Type": "image/png"}, timeout=10)
    assert response.status_code == 413 and response.json()["Response"] == "FAILED"
    response = requests.post(url, data=chunks(bytes(3 << 20)), headers={"Content-Type": "image/png"}, timeout=10)
    assert response.status_code == 413 and response.json()["Response"] == "FAILED"
    assert requests.post(url, data=data, headers={"Content-Type": "image/png"}, timeout=10).json()["Results"] == 1


@pytest.mark.parametrize("size", [6_000_000, 60_000_000])
@pytest.mark.parametrize("chunked", [False, True])
def test_every_body_over_the_limit_gets_the_json_413(waitress_url, size, chunked):
    """5 MB limit: 6 MB reaches Flask, 60 MB is refused by waitress from its Content-Length (or, chunked,
    once the slack is exceeded); both answer the API's JSON 413, and the server keeps serving."""
    url = waitress_url(max_upload_bytes=5_000_000) + "/api/infer"
    body = bytes(size)
    data = (body[i:i + (1 << 20)] for i in range(0, size, 1 << 20)) if chunked else body
    response = requests.post(url, data=data, headers={"Content-Type": "image/png"}, timeout=30)
    assert response.status_code == 413, response.text[:200]
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"Response": "FAILED", "ResponseMessage": "upload too large: the limit is 5000000 bytes"}
    assert requests.get(url.replace("infer", "health"), timeout=10).status_code == 200


def test_waitress_api_key(waitress_url, images):
    url = waitress_url(api_key=KEY) + "/api/infer"
    kwargs = {"data": images["positive"], "timeout": 10}
    response = requests.post(url, **kwargs)
    assert response.status_code == 401 and response.json()["Response"] == "FAILED"
    assert requests.post(url, headers={"Authorization": f"Bearer {KEY}"}, **kwargs).json()["Results"] == 1


def fuzz_cases(images, max_upload):
    """(label, body, content type, allowed statuses): at least 200 bad or odd requests."""
    rng = random.Random(1234)
    positive, negative = images["positive"], images["negative"]
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(positive)).convert("RGB").save(jpeg, "JPEG")
    jpeg = jpeg.getvalue()
    bad = {400, 413, 415}
    cases = []
    for i in range(50):
        cases.append((f"random-{i}", rng.randbytes(rng.randint(1, 4000)), "application/octet-stream", {400}))
    for i in range(30):
        cases.append((f"png-signature-random-{i}", b"\x89PNG\r\n\x1a\n" + rng.randbytes(rng.randint(0, 400)),
                      "image/png", {400}))
    for i in range(30):
        cut = rng.randint(1, len(positive) - 13)  # always loses at least the IEND chunk and some pixels
        cases.append((f"truncated-png-{cut}", positive[:cut], "image/png", {400}))
    for i in range(20):
        cut = rng.randint(1, len(jpeg) - 1)
        cases.append((f"truncated-jpeg-{cut}", jpeg[:cut], "image/jpeg", {200, 400}))
    tiff = io.BytesIO()
    Image.open(io.BytesIO(negative)).save(tiff, "TIFF")
    for i in range(40):
        mutated = bytearray(rng.choice([positive, negative, jpeg, tiff.getvalue()]))
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        cases.append((f"mutated-{i}", bytes(mutated), "application/octet-stream", bad | {200}))
    for i in range(10):
        body, content_type = multipart({"upload": ("x.png", positive), "note": rng.randbytes(20)})
        cases.append((f"multipart-without-file-{i}", body, content_type, {400}))
    for i, content_type in enumerate(["text/plain", "application/json", "text/html", "application/xml",
                                      "application/x-www-form-urlencoded", "video/mp4", "audio/wav",
                                      "application/pdf", "font/woff", "text/csv"]):
        cases.append((f"content-type-{i}", positive, content_type, {415}))
    cases += [
        ("zero-bytes", b"", "image/png", {400}),
        ("one-pixel", image_bytes((1, 1)), "image/png", {200}),
        ("claims-20000x20000", png_claiming(20000, 20000), "image/png", {413}),
        ("claims-20000x20000-with-pixels", png_claiming(20000, 20000, zlib.compress(bytes(5000))), "image/png", {413}),
        ("decompression-bomb", decompression_bomb(), "image/png", {413}),
        ("too-wide", image_bytes((5000, 4), mode="L"), "image/png", {413}),
        ("tiff-overflowing-offset", tiff_with_overflowing_strip_offset(), "image/tiff", {400}),
        ("gif", image_bytes(fmt="GIF", mode="P"), "image/gif", {415}),
        ("webp", image_bytes(fmt="WEBP"), "image/webp", {415}),
        ("larger-than-max-upload", bytes(max_upload + 1), "application/octet-stream", {413}),
        ("multipart-larger-than-max-upload", *multipart({"file": ("big.png", bytes(max_upload))}), {413}),
        ("multipart-bad-boundary", b"--x\r\n\r\n--x--", "multipart/form-data; boundary=y", {400}),
        ("multipart-no-boundary", b"--x\r\n\r\n--x--", "multipart/form-data", {400}),
    ]
    return cases


def test_fuzz_never_a_500_and_still_correct_afterwards(waitress_url, images):
    max_upload = 200_000
    url = waitress_url(max_upload_bytes=max_upload)
    cases = fuzz_cases(images, max_upload)
    assert len(cases) >= 200
    wrong = []
    with requests.Session() as session:
        for label, body, content_type, allowed in cases:
            response = session.post(f"{url}/api/infer", data=body, headers={"Content-Type": content_type},
                                    timeout=10)
            try:
                answer = response.json()
            except ValueError:
                wrong.append((label, response.status_code, "not JSON", response.text[:80]))
                continue
            ok_shape = (answer.get("Response") == "OK" and set(answer) == CONTRACT) if response.status_code == 200 \
                else (answer.get("Response") == "FAILED" and set(answer) == {"Response", "ResponseMessage"})
            if response.status_code not in allowed or not ok_shape or "Traceback" in response.text:
                wrong.append((label, response.status_code, answer))
        assert not wrong, wrong[:10]
        for name, label in (("positive", 1), ("negative", 0)):
            answer = session.post(f"{url}/api/infer", data=images[name], timeout=10).json()
            assert_answer(answer, label)
        health = session.get(f"{url}/api/health", timeout=10).json()
        assert health["requests"]["served"] >= len(cases)


def test_load_four_threads_by_hundred_requests(waitress_url, images):
    url = waitress_url() + "/api/infer"
    errors, latencies = [], []

    def worker(index):
        with requests.Session() as session:
            for i in range(100):
                name, label = (("positive", 1), ("negative", 0))[(index + i) % 2]
                started = time.perf_counter()
                try:
                    response = session.post(url, data=images[name], headers={"Content-Type": "image/png"}, timeout=10)
                    if response.status_code != 200 or response.json()["Results"] != label:
                        errors.append((name, response.status_code, response.text[:100]))
                except requests.RequestException as err:
                    errors.append((name, repr(err)))
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == [] and len(latencies) == 400


# --- MQTT on a real mosquitto ---

def test_results_reach_mqtt_and_a_dead_broker_never_fails_requests(mosquitto, make_config, tiny_classifier,
                                                                   live_server, images):
    config = make_config(mosquitto)
    probe = Probe(mosquitto, [f"{SERVER_TOPIC}/#"])
    publisher = ResultPublisher(config).start()
    try:
        assert publisher.connection.wait_connected(5)
        url = live_server(create_app(config, tiny_classifier, publisher), config)
        answers = {}
        for name in ("positive", "negative"):
            answers[name] = requests.post(f"{url}/api/infer", data=images[name], timeout=10).json()
        assert wait_until(lambda: len(probe.received(f"{SERVER_TOPIC}/Sensors")) == 2, 5)
        assert probe.wait_for(f"{SERVER_TOPIC}/Warnings")
        sensors = [json.loads(p) for p in probe.received(f"{SERVER_TOPIC}/Sensors")]
        warnings = [json.loads(p) for p in probe.received(f"{SERVER_TOPIC}/Warnings")]
        for sensor, name in zip(sensors, ("positive", "negative")):
            answer = answers[name]
            assert sensor["Sensor"] == "CCTV" and sensor["SensorID"] == "EdgeServer"
            assert sensor["Results"] == answer["Results"] and sensor["NeedsReview"] == answer["NeedsReview"]
            assert sensor["Confidence"] == pytest.approx(answer["Confidence"], abs=1e-5)
            assert sensor["SensorValue"] == f"IDC: {answer['Results']} (Confidence: {sensor['Confidence']:.4f})"
        assert len(warnings) == 1  # only the IDC result raises a warning
        assert warnings[0]["WarningValue"] == "RECOGNISED" and warnings[0]["WarningMessage"] == "IDC Detected"
        assert warnings[0]["Confidence"] == pytest.approx(answers["positive"]["Confidence"], abs=1e-5)
        health = requests.get(f"{url}/api/health", timeout=10).json()
        assert health["mqtt"]["enabled"] and health["mqtt"]["connected"]

        mosquitto.stop()  # mid-test: the broker dies
        assert wait_until(lambda: not publisher.status()["connected"], 5)
        slowest = 0.0
        with requests.Session() as session:
            for i in range(30):
                started = time.perf_counter()
                response = session.post(f"{url}/api/infer", data=images[("positive", "negative")[i % 2]], timeout=10)
                slowest = max(slowest, time.perf_counter() - started)
                assert response.status_code == 200 and response.json()["Results"] == (1 - i % 2)
        assert slowest < 1.0, slowest
        health = requests.get(f"{url}/api/health", timeout=10).json()
        assert health["mqtt"]["connected"] is False and health["requests"]["ok"] == 32
    finally:
        publisher.stop()
        probe.close()


# --- HTTPS (werkzeug's threaded server) ---

def test_https_with_tls_cert_and_key(tmp_path, make_config, tiny_classifier, images):
    if shutil.which("openssl") is None:
        pytest.skip("the HTTPS test needs openssl")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", "key.pem", "-out", "cert.pem", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], cwd=tmp_path, check=True, capture_output=True,
                   timeout=30)
    config = make_config(Server={"tls_cert": "cert.pem", "tls_key": "key.pem"})  # relative to confs.json
    server = create_tls_server(create_app(config, tiny_classifier, FakePublisher()), config, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        with pytest.raises(requests.ConnectionError):  # plain HTTP is not answered
            requests.post(f"http://127.0.0.1:{port}/api/infer", data=images["positive"], timeout=5)
        with pytest.raises(requests.exceptions.SSLError):  # a certificate we do not trust
            requests.get(f"https://127.0.0.1:{port}/api/health", timeout=5)
        response = requests.post(f"https://127.0.0.1:{port}/api/infer", data=images["positive"],
                                 verify=str(tmp_path / "cert.pem"), timeout=10)
        assert_answer(response.json(), 1)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --- server.py ---

def test_server_script_help():
    done = subprocess.run([sys.executable, str(ROOT / "server.py"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "--port" in done.stdout and "--config" in done.stdout


def test_server_script_serves_and_stops_on_sigterm(tiny_project, tiny_classifier, images, tmp_path):
    config, _ = tiny_project
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--config", str(config.path),
                                    "--port", str(port), "--precision", "FP16"],
                                   stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        def healthy():
            try:
                return requests.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
            except requests.ConnectionError:
                return process.poll() is not None  # exited: stop waiting
        assert wait_until(healthy, 90, interval=0.2) and process.poll() is None, log_path.read_text()
        answer = requests.post(f"http://127.0.0.1:{port}/api/infer", data=images["positive"], timeout=10).json()
        assert_answer(answer, 1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    log_text = log_path.read_text()
    assert "model: DevCloudIDC openvino-FP16 on CPU" in log_text and "decision rule: threshold 0.54" in log_text and f"serving on http://127.0.0.1:{port}" in log_text
    assert "POST /api/infer 200" in log_text and "stopping" in log_text


def test_server_script_without_a_model_says_so(tmp_path):
    from tests.synthetic import write_config

    done = subprocess.run([sys.executable, str(ROOT / "server.py"), "--config", str(write_config(tmp_path))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "error: no trained model" in done.stderr


def test_server_script_on_a_port_in_use_is_one_error_line(tiny_project, tiny_classifier):
    import socket

    config, _ = tiny_project
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, str(ROOT / "server.py"), "--config", str(config.path),
                               "--port", str(port), "--precision", "FP16"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use (is another server.py "
                      "running? stop it, or choose another --port / Server.port)"], done.stderr


# --- benchmarks/server_load.py (its logic, on the tiny model; the targets are for the real one) ---

def test_server_load_benchmark_runs_on_the_tiny_model(tiny_project, tiny_classifier, tmp_path):
    from idc.edge.engine import served_precision

    config, _ = tiny_project
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "server_load.py"), "--model-dir",
                           str(config.model_dir), "--requests", "60", "--warmup", "4", "--json", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    figures = json.loads(out.read_text())
    assert figures["requests"] == 60 and figures["errors"] == 0 and figures["threads"] == 4
    # The IR server.py serves by default (OpenVINO.precision auto: INT8 where compiled, on this CPU).
    assert figures["backend"] == f"openvino-{served_precision(config)}" and figures["server_requests_served"] == 64
    assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"] and figures["requests_per_second"] > 0
    assert figures["rss_before_mb"] > 0 and figures["targets_met"] == (done.returncode == 0)
    assert "requests/s" in done.stdout and "p99" in done.stdout and "Server RSS" in done.stdout


def test_server_load_benchmark_without_a_model_says_so(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "server_load.py"), "--model-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "nothing to measure" in done.stdout and "compile_ncs.sh" in done.stdout


# --- idle connections cannot starve the server (waitress: connection_limit, idle_timeout) ---

def open_idle_connections(url: str, count: int) -> list:
    """`count` TCP connections to the server that never send a byte."""
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(url)
    return [socket.create_connection((address.hostname, address.port), timeout=5) for _ in range(count)]


def closed_by_server(sock) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""  # end of stream: the server closed it
    except BlockingIOError:
        return False  # still open, nothing to read
    except OSError:
        return True  # reset by the server


def timed_post(url: str, image: bytes, timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    response = requests.post(f"{url}/api/infer", data=image, timeout=timeout)
    return response.status_code, time.monotonic() - started


def test_300_idle_connections_do_not_starve_the_server(make_config, tiny_classifier, publisher, live_server, images):
    config = make_config()  # the defaults of confs.json: 500 connections, 10 s idle timeout
    assert (config.Server.connection_limit, config.Server.idle_timeout) == (500, 10)
    url = live_server(create_app(config, tiny_classifier, publisher), config)
    idle = open_idle_connections(url, 300)
    try:
        for _ in range(3):
            status, seconds = timed_post(url, images["positive"], timeout=10)
            assert status == 200 and seconds < 3, seconds
    finally:
        for sock in idle:
            sock.close()


def test_idle_connections_beyond_the_limit_are_closed_after_the_idle_timeout(make_config, tiny_classifier,
                                                                              publisher, live_server, images):
    config = make_config(Server={"connection_limit": 20, "idle_timeout": 2})
    url = live_server(create_app(config, tiny_classifier, publisher), config)
    idle = open_idle_connections(url, 40)  # 20 over the limit wait in the listen backlog
    try:
        status, seconds = timed_post(url, images["positive"], timeout=20)
        # idle_timeout (2 s) + the sweep interval (1 s) + the backlog's turn; waitress's defaults
        # (120 s) would have made this request time out.
        assert status == 200 and seconds < 10, seconds
        assert sum(map(closed_by_server, idle)) >= 20
    finally:
        for sock in idle:
            sock.close()
