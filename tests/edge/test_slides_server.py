"""The Slides page's server side (idc.edge.web.slides) on real waitress with the tiny model: uploads
streamed to disk and analysed one at a time, the watch folder, the outputs, Deep Zoom, the flagged
tiles in the review queue, bad input (JSON 4xx, the server keeps answering), restarts and stops.
Small real slides are made here (tests/slides.py); the browser side is test_slides_browser.py."""

import csv
import io
import json
import logging
import shutil
import sqlite3
import threading
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import requests
from PIL import Image

from idc.edge.web.app import create_app
from idc.edge.web.slides import SlideWorker
from idc.edge.web.store import ReviewStore
from tests.edge.http_api import FakePublisher, image_bytes
from tests.mosquitto import wait_until
from tests.paths import SHARED, require_shared
from tests.slides import GLASS, paste, write_slide
from tests.synthetic import patch_image

PATCH = 50  # the tiny bundle: 50 px at 4 um/px, so a 4 um/px slide's tile is 50 px
IDC_CELLS = [(c, r) for c in range(2, 5) for r in range(1, 3)]
BENIGN_CELLS = [(c, r) for c in range(6, 9) for r in range(2, 4)]
COLUMNS, ROWS = 11, 5
WAIT = 60  # seconds: every wait is bounded


def slide_pixels(seed: int = 0, cells=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cells = cells or [(1, IDC_CELLS), (0, BENIGN_CELLS)]
    return paste([(np.asarray(patch_image(label, rng)), c * PATCH, r * PATCH) for label, where in cells
                  for c, r in where], (COLUMNS * PATCH, ROWS * PATCH))


def make_slide(path, mpp=4.0, seed=0, cells=None):
    return write_slide(path, slide_pixels(seed, cells), mpp, levels=2, tile=128)


@pytest.fixture
def slides_config(make_config, tiny_project, tmp_path):
    """slides_config(**Slides keys) -> a Config: the tiny model, slides, watch folder, review db in tmp_path."""
    model_config, _ = tiny_project

    def make(server=None, **slides):
        slides = {"output_dir": str(tmp_path / "slides"), "watch_dir": None, "poll_seconds": 0.2, **slides}
        return make_config(ClassifierSettings={"model_dir": str(model_config.model_dir), "image_size": 75},
                           Server={"review_db": str(tmp_path / "review.sqlite3"), **(server or {})}, Slides=slides)

    return make


@pytest.fixture
def serve(slides_config, flagging_classifier, live_server):
    """serve(**Slides keys) -> (base URL, app): the app on real waitress; its worker closed after the test,
    and no slide-worker thread left running."""
    apps = []

    def start(classifier=flagging_classifier, server=None, **slides):
        config = slides_config(server, **slides)
        app = create_app(config, classifier, FakePublisher())
        apps.append(app)
        return live_server(app, config), app

    yield start
    for app in apps:
        app.extensions["idc"].close()
    assert not [t for t in threading.enumerate() if t.name == "slide-worker" and t.is_alive()]


def upload(url, data, name="tumour.tiff", **headers):
    return requests.post(f"{url}/api/slides", params={"name": name} if name else None, data=data,
                         headers={"Content-Type": "application/octet-stream", **headers}, timeout=30)


def wait_for_slide(url, slide, statuses=("done", "failed")):
    def finished():
        response = requests.get(f"{url}/api/slides/{slide}", timeout=10)
        if response.status_code == 404:  # a watched file: not found yet
            return None
        body = response.json()["Slide"]
        return body if body["status"] in statuses else None

    body = wait_until(finished, timeout=WAIT, interval=0.1)
    assert body, requests.get(f"{url}/api/slides", timeout=10).json()
    return body


def assert_json_failure(response, status, says):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["Response"] == "FAILED" and says in body["ResponseMessage"], body
    return body["ResponseMessage"]


def test_an_uploaded_slide_is_analysed_and_its_tiles_to_review_are_queued(serve, tmp_path, caplog):
    url, app = serve()
    path = make_slide(tmp_path / "tumour.tiff")
    sent = upload(url, path.read_bytes())
    assert sent.status_code == 202, sent.text
    assert sent.headers["Location"] == "/api/slides/tumour"
    assert sent.json()["Slide"]["status"] in ("queued", "running")
    slide = wait_for_slide(url, "tumour")
    assert slide["status"] == "done", slide
    summary = slide["summary"]
    tiles = list(csv.DictReader(io.StringIO(requests.get(url + slide["files"]["tiles"], timeout=10).text)))
    assert summary["tiles"]["classified"] == len(tiles) == len(IDC_CELLS) + len(BENIGN_CELLS)
    assert slide["figures"]["tiles"] == len(tiles) and slide["progress"] == {"done": len(tiles), "total": len(tiles)}
    assert summary["tiles_to_review"] == len(slide["flagged"]) == len(tiles)  # the band flags every tile

    # Every flagged tile is a review item that knows its place on the slide, and the slide knows its item.
    queue = requests.get(f"{url}/api/review/queue", params={"patient": "tumour", "status": "all"}, timeout=10).json()
    items = {item["id"]: item for item in queue["Items"]}
    assert len(items) == len(tiles) and queue["Patients"] == ["tumour"]
    for tile in slide["flagged"]:
        item = items[tile["item"]]
        assert tile["size"] == PATCH
        assert (item["slide"], item["slide_x"], item["slide_y"], item["slide_size"]) == (
            "tumour", tile["x"], tile["y"], tile["size"])
        assert (item["x"], item["y"], item["needs_review"]) == (tile["x"], tile["y"], True)
        assert item["p_idc"] == pytest.approx(tile["p_idc"], abs=1e-5) and item["label"] == tile["idc"]
    image = requests.get(f"{url}/api/review/items/{slide['flagged'][0]['item']}/image", timeout=10)
    assert image.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (PATCH, PATCH)
    one = requests.get(f"{url}/api/review/queue", params={"item": slide["flagged"][0]["item"]}, timeout=10).json()
    assert [i["id"] for i in one["Items"]] == [slide["flagged"][0]["item"]] and one["Matching"] == 1

    # The outputs, by name only; the Deep Zoom image and its tiles.
    for name in ("tiles.csv", "overlay.png", "heatmap.png", "tiles.geojson", "regions.geojson", "summary.json"):
        assert requests.get(f"{url}/api/slides/tumour/files/{name}", timeout=10).status_code == 200, name
    assert Image.open(io.BytesIO(requests.get(url + slide["files"]["overlay"], timeout=10).content)).size == (
        COLUMNS, ROWS)
    for bad in ("source.json", "review.json"):
        assert_json_failure(requests.get(f"{url}/api/slides/tumour/files/{bad}", timeout=10), 404, "no file")
    assert_json_failure(requests.get(f"{url}/api/slides/tumour/files/..%2Fsource.json", timeout=10), 404, "not found")
    dzi = requests.get(url + slide["dzi"], timeout=10)
    assert dzi.headers["Content-Type"].startswith("application/xml")
    root = ET.fromstring(dzi.text)
    size = root.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert (root.get("TileSize"), root.get("Overlap"), root.get("Format")) == ("254", "1", "jpeg")
    assert (int(size.get("Width")), int(size.get("Height"))) == (COLUMNS * PATCH, ROWS * PATCH)
    top = 10  # ceil(log2(550)): the full-resolution level
    caplog.set_level(logging.INFO, logger="idc.edge.web.app")
    tile = requests.get(f"{url}/slides/tumour_files/{top}/0_0.jpeg", timeout=10)
    assert tile.headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(tile.content)).size == (255, 250)  # 254 and the overlap on one side
    assert_json_failure(requests.get(f"{url}/slides/tumour_files/{top + 1}/0_0.jpeg", timeout=10), 404, "no tile")
    assert_json_failure(requests.get(f"{url}/slides/tumour_files/{top}/9_9.jpeg", timeout=10), 404, "no tile")
    lines = [r.getMessage() for r in caplog.records if r.name == "idc.edge.web.app"]
    assert not any(f"tumour_files/{top}/0_0.jpeg 200" in line for line in lines)  # a served tile: below INFO
    assert any(f"tumour_files/{top}/9_9.jpeg 404" in line for line in lines)  # a failed one: logged
    assert_json_failure(requests.get(f"{url}/api/slides/nothing", timeout=10), 404, "no slide 'nothing'")
    assert requests.get(f"{url}/slides/tumour", timeout=10).status_code == 200
    assert requests.get(f"{url}/slides", timeout=10).status_code == 200

    # The same file again, as a multipart upload: another slide, its own id; the store keeps one item
    # per image, so its tiles lead to the first slide's items (the same pixels).
    body = requests.post(f"{url}/api/slides", files={"file": ("tumour.tiff", path.read_bytes())}, timeout=30)
    assert body.status_code == 202 and body.json()["Slide"]["id"] == "tumour-2", body.text
    again = wait_for_slide(url, "tumour-2")
    assert again["status"] == "done" and {t["item"] for t in again["flagged"]} == set(items)
    listed = requests.get(f"{url}/api/slides", timeout=10).json()
    assert [(s["id"], s["file"], s["source"], s["status"]) for s in listed["Slides"]] == [
        ("tumour", "tumour.tiff", "upload", "done"), ("tumour-2", "tumour.tiff", "upload", "done")]
    assert listed["ResponseMessage"] == "2 slides: 2 done"
    assert sorted(p.name for p in (tmp_path / "slides" / ".uploads").iterdir()) == ["tumour-2.tiff", "tumour.tiff"]


def test_a_slide_in_the_watch_folder_is_analysed_once_also_after_a_restart(serve, tmp_path):
    watch = tmp_path / "watch"
    watch.mkdir()
    url, app = serve(watch_dir=str(watch))
    make_slide(tmp_path / "scan.tiff")
    shutil.copy(tmp_path / "scan.tiff", watch / "S-001 scan.tiff")
    (watch / "notes.txt").write_text("not a slide")
    slide = wait_for_slide(url, "S-001_scan")
    assert (slide["status"], slide["source"], slide["file"]) == ("done", "watch", "S-001 scan.tiff"), slide
    app.extensions["idc"].close()

    # A restart: the result on disk is the slide, done; its unchanged file is not analysed again.
    url, app = serve(watch_dir=str(watch))
    worker = app.extensions["idc"].slides
    assert worker.running
    [again] = requests.get(f"{url}/api/slides", timeout=10).json()["Slides"]
    assert (again["id"], again["status"], again["figures"]) == ("S-001_scan", "done", slide["figures"])
    assert not wait_until(lambda: worker.job("S-001_scan").status != "done", timeout=1.0)  # five polls
    assert requests.get(url + slide["dzi"], timeout=10).status_code == 200


def test_a_real_scan_in_the_watch_folder(serve, tmp_path):
    """An Aperio .svs rebuilt from a test patient's patches (../shared): analysed, viewable, its tiles queued."""
    real = require_shared(SHARED / "data" / "slides" / "mpp4" / "9023.svs")
    watch = tmp_path / "watch"
    watch.mkdir()
    url, app = serve(watch_dir=str(watch))
    shutil.copy(real, watch / real.name)
    slide = wait_for_slide(url, "9023")
    assert slide["status"] == "done" and slide["summary"]["slide"]["vendor"] == "aperio", slide
    assert slide["figures"]["tiles"] > 100 and slide["figures"]["tiles_to_review"] == slide["figures"]["tiles"]
    size = ET.fromstring(requests.get(url + slide["dzi"], timeout=10).text)[0]
    assert (int(size.get("Width")), int(size.get("Height"))) == (slide["summary"]["slide"]["width"],
                                                                  slide["summary"]["slide"]["height"])
    queue = requests.get(f"{url}/api/review/queue", params={"patient": "9023", "limit": 1}, timeout=10).json()
    assert queue["Matching"] == len({tile["item"] for tile in slide["flagged"]}) > 100


def test_a_file_still_being_written_waits_for_the_next_poll(slides_config, flagging_classifier, tmp_path):
    """The worker's poll, without its thread: a file is queued once its size and mtime held for one poll."""
    watch = tmp_path / "watch"
    watch.mkdir()
    config = slides_config(watch_dir=str(watch))
    worker = SlideWorker(config, flagging_classifier, ReviewStore(tmp_path / "review.sqlite3"))
    data = make_slide(tmp_path / "scan.svs").read_bytes()
    target = watch / "scan.svs"
    target.write_bytes(data[: len(data) // 2])
    worker.poll()  # seen for the first time
    with target.open("ab") as f:
        f.write(data[len(data) // 2:])
    worker.poll()  # grown since: still waiting
    assert worker.jobs() == []
    worker.poll()  # unchanged for one poll: queued, once
    worker.poll()
    assert [(j["id"], j["status"], j["source"]) for j in worker.jobs()] == [("scan", "queued", "watch")]
    assert not worker.running  # never started: nothing to stop


@pytest.mark.parametrize("case", ["png renamed", "random bytes", "truncated svs", "no scale", "wrong suffix",
                                  "multi-file format", "empty", "no name", "multipart without file", "too large",
                                  "too large, chunked"])
def test_bad_uploads_get_a_json_4xx_and_leave_nothing_behind(case, serve, tmp_path):
    url, app = serve(max_upload_bytes=200_000)
    rng = np.random.default_rng(1)
    if case == "png renamed":
        response, status, says = upload(url, image_bytes(), "patch.svs"), 400, "not a slide OpenSlide can read"
    elif case == "random bytes":
        response, status, says = upload(url, rng.bytes(50_000), "scan.svs"), 400, "not a slide OpenSlide can read"
    elif case == "truncated svs":
        real = require_shared(SHARED / "data" / "slides" / "mpp4" / "8956.svs").read_bytes()
        response = upload(url, real[: len(real) // 5], "8956.svs")
        status, says = 400, "8956.svs is not a slide OpenSlide can read"
    elif case == "no scale":
        path = make_slide(tmp_path / "noscale.tiff", mpp=None)
        response, status, says = upload(url, path.read_bytes(), "noscale.tiff"), 400, "does not say its scale"
    elif case == "wrong suffix":
        response, status, says = upload(url, image_bytes(), "patch.png"), 415, "not a slide file name"
    elif case == "multi-file format":
        response, status, says = upload(url, b"x" * 100, "scan.mrxs"), 415, "put the slide"
    elif case == "empty":
        response, status, says = upload(url, b"", "scan.svs"), 400, "empty upload"
    elif case == "no name":
        response, status, says = upload(url, b"x" * 100, None), 400, "?name=FILE.svs"
    elif case == "multipart without file":
        response = requests.post(f"{url}/api/slides", files={"other": ("a.svs", b"x")}, timeout=30)
        status, says = 400, "without a 'file' field"
    elif case == "too large":
        response, status, says = upload(url, b"x" * 200_001, "big.svs"), 413, "the limit is 200000 bytes"
    else:
        chunks = (b"x" * 50_000 for _ in range(5))  # no Content-Length: refused once the limit is passed
        response, status, says = upload(url, chunks, "big.svs"), 413, "Slides.max_upload_bytes"
    assert_json_failure(response, status, says)
    assert requests.get(f"{url}/api/health", timeout=10).status_code == 200
    uploads = tmp_path / "slides" / ".uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []
    assert requests.get(f"{url}/api/slides", timeout=10).json()["Slides"] == []


def test_a_slide_larger_than_the_patch_limit_is_taken_and_only_the_slide_route_has_the_larger_limit(serve, tmp_path):
    """waitress refuses bodies over Server.max_upload_bytes before Flask sees them, except POST /api/slides,
    whose limit is Slides.max_upload_bytes (its JSON 413 names that key)."""
    # 3 MiB of bytes no directory points to after a small slide: still a valid TIFF, larger than the
    # patch routes' limit plus waitress's slack (1 MiB).
    slide = make_slide(tmp_path / "scan.tiff").read_bytes() + bytes(3 << 20)
    patch_limit = 100_000
    url, _ = serve(server={"max_upload_bytes": patch_limit}, max_upload_bytes=len(slide) + 10)
    response = upload(url, slide, "scan.tiff")
    assert response.status_code == 202, response.text
    assert wait_for_slide(url, "scan")["status"] == "done"
    big = b"x" * (len(slide) + 10 + (2 << 20))  # over the slides' limit and the slack: waitress's own 413
    assert_json_failure(upload(url, big, "big.svs"), 413, "Slides.max_upload_bytes")
    patch = requests.post(f"{url}/api/infer", files={"file": ("p.png", slide)}, timeout=30)
    assert_json_failure(patch, 413, f"the limit is {patch_limit} bytes")


def test_a_slide_that_fails_in_its_job_is_failed_with_the_message_and_the_next_one_runs(serve, tmp_path):
    url, app = serve(default_mpp=4.0)
    glass = write_slide(tmp_path / "blank.tiff", np.full((ROWS * PATCH, COLUMNS * PATCH, 3), GLASS, np.uint8), 4.0)
    assert upload(url, glass.read_bytes(), "blank.tiff").status_code == 202
    # No scale in the file: Slides.default_mpp says it.
    assert upload(url, make_slide(tmp_path / "noscale.tiff", mpp=None).read_bytes(), "noscale.tiff").status_code == 202
    failed = wait_for_slide(url, "blank")
    assert failed["status"] == "failed" and "no tissue found" in failed["message"], failed
    assert "summary" not in failed and failed["figures"] is None
    done = wait_for_slide(url, "noscale")
    assert done["status"] == "done" and done["summary"]["slide"]["mpp_source"] == "given", done
    assert sorted(p.name for p in (tmp_path / "slides" / ".uploads").iterdir()) == ["noscale.tiff"]  # failed: removed
    assert_json_failure(requests.get(f"{url}/api/slides/blank/files/tiles.csv", timeout=10), 404, "blank has no")


class BrokenOnce:
    """The tiny classifier, but its first batch raises (a fault the worker did not expect)."""

    def __init__(self, classifier):
        self._classifier, self.calls = classifier, 0

    def __getattr__(self, name):
        return getattr(self._classifier, name)

    def probabilities(self, images):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("inference device lost")
        return self._classifier.probabilities(images)


def test_an_unexpected_fault_fails_that_slide_only(serve, flagging_classifier, tmp_path):
    url, app = serve(classifier=BrokenOnce(flagging_classifier))
    path = make_slide(tmp_path / "a.tiff")
    for name in ("first.tiff", "second.tiff"):
        assert upload(url, path.read_bytes(), name).status_code == 202
    first = wait_for_slide(url, "first")
    assert first["status"] == "failed"
    assert first["message"].startswith("the analysis failed (RuntimeError: inference device lost)"), first
    assert wait_for_slide(url, "second")["status"] == "done"
    health = requests.get(f"{url}/api/health", timeout=10)
    assert health.status_code == 200
    slides = health.json()["slides"]
    assert slides["enabled"] and slides["slides"] == {"failed": 1, "done": 1} and slides["in_progress"] is None


class Slow:
    """The tiny classifier, a tenth of a second a batch (a job that is surely still running when stopped)."""

    def __init__(self, classifier):
        self._classifier = classifier

    def __getattr__(self, name):
        return getattr(self._classifier, name)

    def probabilities(self, images):
        time.sleep(0.1)
        return self._classifier.probabilities(images)


def test_an_upload_left_unfinished_runs_after_a_restart_and_a_stop_is_prompt(slides_config, flagging_classifier,
                                                                               tmp_path):
    """A stop ends the job in progress at its next batch (queued again); the next start analyses it."""
    config = slides_config(batch_size=1)
    uploads = tmp_path / "slides" / ".uploads"
    uploads.mkdir(parents=True)
    make_slide(uploads / "big.tiff")
    store = ReviewStore(tmp_path / "review.sqlite3")
    worker = SlideWorker(config, Slow(flagging_classifier), store).start()
    assert wait_until(lambda: worker.job("big").done > 0, timeout=WAIT)
    started = time.monotonic()
    worker.close()
    assert not worker.running and time.monotonic() - started < 1.0
    job = worker.job("big")
    assert (job.status, job.message) == ("queued", "stopped with the server: analysed again after a restart")
    worker = SlideWorker(config, flagging_classifier, store).start()
    try:
        assert wait_until(lambda: worker.job("big").status == "done", timeout=WAIT), worker.jobs()
    finally:
        worker.close()
    assert worker.job("big").message.startswith("done in")


def test_with_an_api_key_slides_need_it_and_uploads_are_changes(serve, tmp_path):
    url, app = serve(server={"api_key": "s3cret"})
    key = {"X-API-Key": "s3cret"}
    assert_json_failure(requests.get(f"{url}/api/slides", timeout=10), 401, "API key required")
    assert_json_failure(upload(url, b"x" * 10, "a.svs"), 401, "API key required")
    assert requests.get(f"{url}/slides", timeout=10).status_code == 401  # the key form
    assert requests.get(f"{url}/api/slides", headers=key, timeout=10).json()["Slides"] == []
    sent = upload(url, make_slide(tmp_path / "k.tiff").read_bytes(), "k.tiff", **key)
    assert sent.status_code == 202
    assert_json_failure(requests.get(f"{url}/slides/k.dzi", timeout=10), 401, "API key required")
    assert requests.get(f"{url}/slides/k.dzi", headers=key, timeout=10).status_code == 200
    # The key form of a slide's page sends the browser back there; the session then opens the viewer.
    station = requests.Session()
    assert 'value="/slides/k"' in station.get(f"{url}/slides/k", timeout=10).text
    login = station.post(f"{url}/login", data={"key": "s3cret", "next": "/slides/k"}, allow_redirects=False, timeout=10)
    assert (login.status_code, login.headers["Location"]) == (303, "/slides/k")
    assert station.get(f"{url}/slides/k", timeout=10).status_code == 200
    assert station.get(f"{url}/slides/k.dzi", timeout=10).status_code == 200
    assert_json_failure(station.post(f"{url}/api/slides?name=k.tiff", data=b"x", timeout=10), 403, "X-IDC-Station")


def test_a_queue_from_before_slides_gets_the_slide_columns(tmp_path):
    db = tmp_path / "review.sqlite3"
    old = sqlite3.connect(db)
    old.executescript("""CREATE TABLE items (id INTEGER PRIMARY KEY AUTOINCREMENT, sha256 TEXT NOT NULL UNIQUE,
        name TEXT, patient TEXT, x INTEGER, y INTEGER, format TEXT NOT NULL, image BLOB NOT NULL,
        p_idc REAL NOT NULL, label INTEGER NOT NULL, needs_review INTEGER NOT NULL, reason TEXT NOT NULL,
        model TEXT, created_at TEXT NOT NULL, decision TEXT, note TEXT, reviewer TEXT, reviewed_at TEXT,
        review_label TEXT);""")
    old.execute("INSERT INTO items (sha256, name, format, image, p_idc, label, needs_review, reason, created_at, "
                "decision, review_label) VALUES ('h', 'a.png', 'PNG', x'00', 0.5, 1, 1, 'review', '2024', 'agree', "
                "'idc')")
    old.commit()
    old.close()
    [item] = ReviewStore(db).items("all")
    assert (item["review_label"], item["slide"], item["slide_x"], item["slide_size"]) == ("idc", None, None, None)
    columns = [row[1] for row in sqlite3.connect(db).execute("PRAGMA table_info(items)")]
    assert columns[-4:] == ["slide", "slide_x", "slide_y", "slide_size"]
    assert json.dumps(ReviewStore(db).items("all")) == json.dumps([item])  # a second opening changes nothing


def test_without_a_model_slides_are_listed_but_none_is_taken(slides_config, tmp_path):
    watch = tmp_path / "watch"
    watch.mkdir()
    app = create_app(slides_config(watch_dir=str(watch)), None, FakePublisher())
    try:
        client = app.test_client()
        assert client.get("/api/slides").get_json()["Slides"] == []
        refused = client.post("/api/slides?name=a.svs", data=b"x")
        assert refused.status_code == 503 and "model not loaded" in refused.get_json()["ResponseMessage"]
        assert not app.extensions["idc"].slides.running  # the watch folder is not watched
    finally:
        app.extensions["idc"].close()
