"""The review station's API (idc.edge.web: review, batch, metrics; idc.edge.identity): Flask's test client, real
SQLite files, real processes writing at once. The browser tests are in test_review_browser.py."""

import base64
import io
import json
import sqlite3
import subprocess
import sys
import zipfile

import pytest
from prometheus_client.parser import text_string_to_metric_families

from idc.core.config import load_config
from idc.core.errors import ConfigError, ReviewExportError
from idc.core.review_export import read_csv
from idc.edge.web.app import create_app
from idc.edge.web.store import QueueEntry, ReviewStore
from tests.paths import ROOT
from tests.synthetic import make_dataset
from tests.edge.http_api import CONTRACT, FakePublisher, assert_answer, assert_failed, image_bytes, multipart

IDENTITY_HEADERS = ("X-IDC-Model", "X-IDC-Model-Precision", "X-IDC-Model-Hash")


@pytest.fixture(scope="module")
def images(tiny_project):
    config, _ = tiny_project
    test = config.model_dir / "test"
    return {"positive": (test / "positive.png").read_bytes(), "negative": (test / "negative.png").read_bytes()}


@pytest.fixture
def station(make_config, tiny_classifier, tmp_path):
    """station(classifier=tiny, **Server keys) -> Flask test client; the review db is in tmp_path."""
    def make(classifier=tiny_classifier, **server):
        server.setdefault("review_db", str(tmp_path / "review.sqlite3"))
        app = create_app(make_config(Server=server), classifier, FakePublisher())
        return app.test_client()

    return make


def zip_of(files: dict) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return out.getvalue()


def patient_zip(tmp_path, patients=1, per_class=4) -> tuple[bytes, list[str]]:
    root = make_dataset(tmp_path / "patient", patients=patients, per_class=per_class, seed=3)
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}
    return zip_of(files), list(files)


def batch(client, fields=None, data=None, content_type=None, query="", **headers):
    if fields is not None:
        data, content_type = multipart_many(fields)
    return client.post("/api/infer/batch" + query, data=data, headers={"Content-Type": content_type, **headers})


def multipart_many(files: list[tuple[str, bytes]], field="file") -> tuple[bytes, str]:
    boundary = "----idc-batch-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# --- POST /api/infer/batch ---

def test_batch_of_files_answers_each_with_the_single_contract(station, images):
    client = station()
    response = batch(client, [("pos.png", images["positive"]), ("neg.png", images["negative"])])
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["Response"] == "OK" and body["Count"] == 2 and body["Failed"] == 0
    assert body["Model"]["name"] == "DevCloudIDC" and body["Model"]["precision"] == "FP16"
    assert len(body["Model"]["hash"]) == 16 and response.headers["X-IDC-Model-Hash"] == body["Model"]["hash"]
    for result, (name, label) in zip(body["Results"], (("pos.png", 1), ("neg.png", 0))):
        assert result["File"] == name and result["Patient"] is None
        assert_answer({k: result[k] for k in CONTRACT}, label)


def test_batch_zip_of_a_patient_in_the_kaggle_layout(station, tmp_path):
    client = station()
    data, names = patient_zip(tmp_path, per_class=5)
    response = batch(client, data=data, content_type="application/zip")
    body = response.get_json()
    assert response.status_code == 200 and body["Count"] == len(names) == 10
    assert [r["File"] for r in body["Results"]] == names
    for result in body["Results"]:
        label = int(result["File"][-5])  # synthetic patches are easy: the tiny model gets them right
        assert result["Response"] == "OK" and result["Results"] == label
        assert result["Patient"] == "9000" and result["X"] % 50 == 0 and result["Y"] == 50 * label
    # The same zip as a multipart file, with images: each result carries its image as a data: URL.
    response = batch(client, [("patient.zip", data)], query="?images=1")
    first = response.get_json()["Results"][0]
    assert first["Image"].startswith("data:image/png;base64,")
    assert base64.b64decode(first["Image"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_streams_ndjson_when_asked(station, tmp_path):
    data, names = patient_zip(tmp_path, per_class=20)
    response = batch(station(), data=data, content_type="application/zip", Accept="application/x-ndjson")
    assert response.status_code == 200 and response.mimetype == "application/x-ndjson"
    lines = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    assert lines[0]["Count"] == 40 and lines[0]["Files"] == names and lines[0]["Model"]["name"] == "DevCloudIDC"
    assert [line["File"] for line in lines[1:]] == names and all(line["Response"] == "OK" for line in lines[1:])


def test_batch_bad_images_fail_alone(station, images):
    body = batch(station(), [("good.png", images["positive"]), ("text.png", b"not an image"),
                             ("empty.png", b""), ("gif.gif", image_bytes(fmt="GIF", mode="L"))]).get_json()
    statuses = [(r["Response"], r.get("Status")) for r in body["Results"]]
    assert statuses == [("OK", None), ("FAILED", 400), ("FAILED", 400), ("FAILED", 415)]
    assert body["Failed"] == 3 and "not an image" in body["Results"][1]["ResponseMessage"]


def zip_bomb(side_bytes: int) -> bytes:
    return zip_of({"bomb.png": bytes(side_bytes)})


@pytest.mark.parametrize("data, status, says", [
    (b"PK\x03\x04 this is not really a zip", 400, "not a readable zip"),
    (zip_of({"../../etc/evil.png": b"x"}), 400, "path outside the archive"),
    (zip_of({"/abs/evil.png": b"x"}), 400, "path outside the archive"),
    (zip_of({"C:/evil.png": b"x"}), 400, "path outside the archive"),
    (zip_of({f"p/{i}.png": b"x" for i in range(6)}), 413, "the limit is 5"),
    (zip_bomb(3_000_000), 413, "zip bomb"),
    (zip_of({}), 400, "no images"),
    (b"GIF89a not a zip", 400, "not a zip"),
])
def test_batch_zip_refusals_are_clear_4xx(station, data, status, says):
    client = station(batch_max_files=5, batch_max_unzipped_bytes=1_000_000)
    assert_failed(batch(client, data=data, content_type="application/zip"), status, says)


def test_batch_request_errors_are_the_single_endpoints(station, images, make_config):
    client = station(batch_max_files=3, max_upload_bytes=50_000)
    assert_failed(batch(client, data=b"hello", content_type="text/plain"), 415, "unsupported content type")
    body, content_type = multipart({"other": b"x"})
    assert_failed(batch(client, data=body, content_type=content_type), 400, "without files")
    assert_failed(batch(client, [(f"{i}.png", images["negative"]) for i in range(4)]), 413, "batch_max_files")
    assert_failed(batch(client, [("big.png", bytes(60_000))]), 413, "upload too large")
    no_model = create_app(make_config(Server={"review_db": None}), None, FakePublisher()).test_client()
    assert_failed(batch(no_model, [("a.png", images["negative"])]), 503, "model not loaded")


def test_batch_and_queue_need_the_api_key(station, images):
    client = station(api_key="s3cret")
    for response in (batch(client, [("a.png", images["positive"])]), client.get("/api/review/queue"),
                     client.get("/api/review/export.csv"), client.get("/metrics"),
                     client.post("/api/review/items/1", json={"decision": "agree"})):
        assert_failed(response, 401, "API key")
    assert batch(client, [("a.png", images["positive"])], **{"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/api/review/queue", headers={"Authorization": "Bearer s3cret"}).status_code == 200


# --- identity on every reply; the single-image contract is unchanged ---

def test_every_reply_and_health_carry_the_model_identity(station, images):
    client = station()
    infer = client.post("/api/infer", data=images["positive"], headers={"Content-Type": "image/png"})
    assert set(infer.get_json()) == CONTRACT
    for response in (infer, client.get("/api/health"), client.get("/"), client.get("/nope"),
                     client.post("/api/infer", data=b"x")):
        assert [response.headers.get(h) for h in IDENTITY_HEADERS][:2] == ["DevCloudIDC", "FP16"], response
        assert len(response.headers["X-IDC-Model-Hash"]) == 16
    health = client.get("/api/health").get_json()
    assert health["identity"]["hash"] == infer.headers["X-IDC-Model-Hash"]
    assert health["review"]["enabled"] is True and health["review"]["pending"] >= 0


# --- the review queue ---

def test_flagged_patches_are_queued_reviewed_and_exported(station, flagging_classifier, images, tmp_path):
    client = station(classifier=flagging_classifier)
    infer = client.post("/api/infer", data=images["positive"], headers={"Content-Type": "image/png"})
    assert infer.get_json()["NeedsReview"] is True
    body = batch(client, [("9000_idx5_x100_y50_class1.png", images["negative"]),
                          ("again.png", images["positive"])]).get_json()  # the same bytes: queued once
    assert body["Results"][1]["ReviewId"] == 1 and body["Results"][0]["ReviewId"] == 2
    queue = client.get("/api/review/queue?order=oldest").get_json()
    assert queue["Pending"] == 2 and [item["id"] for item in queue["Items"]] == [1, 2]
    assert queue["Items"][1]["patient"] == "9000" and (queue["Items"][1]["x"], queue["Items"][1]["y"]) == (100, 50)
    image = client.get("/api/review/items/1/image")
    assert image.mimetype == "image/png" and image.data == images["positive"]
    assert_failed(client.post("/api/review/items/1", json={"decision": "maybe"}), 400, "decision must be")
    assert_failed(client.post("/api/review/items/99", json={"decision": "agree"}), 404, "no review item 99")
    assert_failed(client.post("/api/review/items/1", data="agree"), 415, "send JSON")
    done = client.post("/api/review/items/1", json={"decision": "agree", "note": "clear IDC", "reviewer": "Dr A"})
    assert done.status_code == 200 and done.get_json()["Item"]["reviewer"] == "Dr A"
    client.post("/api/review/items/2", json={"decision": "disagree"})
    assert client.get("/api/review/queue").get_json()["Pending"] == 0
    reviewed = client.get("/api/review/queue?status=reviewed").get_json()["Items"]
    assert {item["decision"] for item in reviewed} == {"agree", "disagree"}
    export = client.get("/api/review/export.csv")
    assert export.mimetype == "text/csv" and "attachment" in export.headers["Content-Disposition"]
    path = tmp_path / "export.csv"
    path.write_bytes(export.data)
    patches = {p.id: p for p in read_csv(path)}
    model_label_2 = reviewed[[i["id"] for i in reviewed].index(2)]["label"]
    assert patches["1"].label == 1 and patches["1"].image == images["positive"]
    assert patches["2"].label == 1 - model_label_2 and patches["2"].patient == "9000"  # disagree flips


def test_review_all_idc_queues_every_idc_verdict(station, images):
    client = station(review_all_idc=True)
    for name in ("positive", "negative"):
        client.post("/api/infer", data=images[name], headers={"Content-Type": "image/png"})
    items = client.get("/api/review/queue").get_json()["Items"]
    assert [(item["label"], item["reason"]) for item in items] == [(1, "idc")]


def test_the_queue_survives_a_new_app_on_the_same_file(station, flagging_classifier, images):
    first = station(classifier=flagging_classifier)
    first.post("/api/infer", data=images["negative"], headers={"Content-Type": "image/png"})
    first.post("/api/review/items/1", json={"decision": "unsure", "note": "blurry"})
    second = station(classifier=flagging_classifier)
    item = second.get("/api/review/queue?status=all").get_json()["Items"][0]
    assert (item["decision"], item["note"]) == ("unsure", "blurry")


def test_the_reviewer_sets_the_label_and_the_decision_follows(station, flagging_classifier, images, tmp_path):
    import csv

    client = station(classifier=flagging_classifier)
    images = {**images, "other": image_bytes()}
    ids = [batch(client, [(name, images[kind])]).get_json()["Results"][0]["ReviewId"]
           for name, kind in (("pos.png", "positive"), ("neg.png", "negative"), ("other.png", "other"))]
    pos, neg, other = ids
    assert len(set(ids)) == 3
    flipped = client.post(f"/api/review/items/{neg}", json={"label": "idc", "reviewer": "Dr B", "note": "nests"})
    body = flipped.get_json()
    assert flipped.status_code == 200 and (body["Label"], body["Decision"]) == ("idc", "disagree")
    assert body["ResponseMessage"] == f"item {neg}: IDC (the model: no IDC; disagree)"
    item = body["Item"]
    assert (item["label"], item["review_label"], item["decision"], item["reviewer"]) == (0, "idc", "disagree", "Dr B")
    kept = client.post(f"/api/review/items/{pos}", json={"label": "idc"}).get_json()
    assert (kept["Label"], kept["Decision"], kept["Item"]["review_label"]) == ("idc", "agree", "idc")
    unsure = client.post(f"/api/review/items/{other}", json={"label": "unsure"}).get_json()
    assert (unsure["Label"], unsure["Decision"]) == ("unsure", "unsure")
    # The first station's clients send a decision: converted to the label against the model's verdict.
    old = client.post(f"/api/review/items/{pos}", json={"decision": "disagree"}).get_json()
    assert (old["Label"], old["Decision"], old["Item"]["review_label"]) == ("no_idc", "disagree", "no_idc")
    assert client.post(f"/api/review/items/{pos}", json={"decision": "agree"}).get_json()["Label"] == "idc"
    for bad, says in (({"label": "IDC"}, "label must be one of idc, no_idc, unsure"),
                      ({"label": "idc", "decision": "agree"}, "not both"), ({"note": "x"}, "label must be"),
                      ({"label": 1}, "label must be")):
        assert_failed(client.post(f"/api/review/items/{pos}", json=bad), 400, says)
    assert_failed(client.post("/api/review/items/99", json={"label": "idc"}), 404, "no review item 99")
    # The export: label is the reviewer's, decision derived from it and the model's.
    export = client.get("/api/review/export.csv").get_data(as_text=True)
    rows = {int(r["id"]): r for r in csv.DictReader(io.StringIO(export))}
    assert [(rows[i]["label"], rows[i]["model_label"], rows[i]["decision"]) for i in ids] == [
        ("1", "1", "agree"), ("1", "0", "disagree"), ("", str(unsure["Item"]["label"]), "unsure")]
    path = tmp_path / "export.csv"
    path.write_text(export)
    assert sorted((int(p.id), p.label) for p in read_csv(path)) == [(pos, 1), (neg, 1)]


def seed_queue(path) -> dict:
    """A queue of known items (threshold 0.5): name -> id; three reviewed."""
    store = ReviewStore(path)
    entries = [  # p_idc, model label, flagged by the band, name
        (0.5165, 1, True, "9036/1/9036_idx5_x1001_y801_class1.png"),
        (0.4822, 0, True, "9036/0/9036_idx5_x1051_y801_class0.png"),
        (0.9300, 1, False, "9036/1/9036_idx5_x1101_y801_class1.png"),  # queued as IDC (review_all_idc)
        (0.5010, 1, True, "10253/1/10253_idx5_x51_y51_class1.png"),
        (0.3600, 0, True, "loose.png"),
        (0.6400, 1, True, "10253/0/10253_idx5_x101_y51_class0.png"),
    ]
    ids = store.add([QueueEntry(image_bytes(colour=(i, 100, 150)), "PNG", p, label, review, name)
                     for i, (p, label, review, name) in enumerate(entries)])
    named = {name.rsplit("/", 1)[-1]: item_id for (_, _, _, name), item_id in zip(entries, ids)}
    store.review(named["9036_idx5_x1051_y801_class0.png"], "idc")  # disagrees
    store.review(named["10253_idx5_x101_y51_class0.png"], "idc")  # agrees
    store.review(named["loose.png"], "unsure")
    return named


def test_the_queue_is_most_uncertain_first_with_filters(station, flagging_classifier, tmp_path):
    named = seed_queue(tmp_path / "review.sqlite3")
    client = station(classifier=flagging_classifier)  # threshold 0.5

    def names(query=""):
        body = client.get("/api/review/queue" + query).get_json()
        return [item["name"].rsplit("/", 1)[-1].split("_class")[0] for item in body["Items"]], body

    order, body = names()
    assert order == ["10253_idx5_x51_y51", "9036_idx5_x1001_y801", "9036_idx5_x1101_y801"]  # |p - 0.5| ascending
    assert (body["Order"], body["Threshold"], body["Pending"], body["Reviewed"], body["Matching"]) == (
        "uncertain", 0.5, 3, 3, 3)
    assert body["Patients"] == ["9036", "10253"]
    assert names("?status=all")[0] == ["10253_idx5_x51_y51", "9036_idx5_x1001_y801", "9036_idx5_x1051_y801",
                                       "loose.png", "10253_idx5_x101_y51", "9036_idx5_x1101_y801"]
    assert names("?status=all&order=oldest")[0][:2] == ["9036_idx5_x1001_y801", "9036_idx5_x1051_y801"]
    assert names("?status=all&order=newest")[0][0] == "10253_idx5_x101_y51"
    assert names("?status=all&order=reviewed")[0][3:] == ["10253_idx5_x51_y51", "9036_idx5_x1101_y801",
                                                           "9036_idx5_x1001_y801"]  # the pending ones last
    needs, body = names("?needs_review=1")
    assert needs == ["10253_idx5_x51_y51", "9036_idx5_x1001_y801"] and body["Matching"] == 2
    assert names("?status=all&disagreements=1")[0] == ["9036_idx5_x1051_y801"]  # not the agreement, not unsure
    assert names("?disagreements=true")[0] == []  # filters AND with the status: a disagreement is reviewed
    assert names("?status=all&patient=10253")[0] == ["10253_idx5_x51_y51", "10253_idx5_x101_y51"]
    assert names("?status=all&patient=10253&needs_review=1&limit=1")[1]["Matching"] == 2
    assert names("?patient=nobody")[0] == [] and names("?needs_review=0")[1]["Matching"] == 3
    for bad, says in (("order=random", "order must be one of uncertain, oldest, newest, reviewed"),
                      ("status=done", "status must be one of pending, reviewed, all"),
                      ("needs_review=maybe", "needs_review must be 1 or 0"),
                      ("disagreements=2", "disagreements must be"), ("patient=" + "9" * 101, "patient must be")):
        assert_failed(client.get("/api/review/queue?" + bad), 400, says)
    [disagreement] = client.get("/api/review/queue?status=reviewed&disagreements=1").get_json()["Items"]
    assert disagreement["id"] == named["9036_idx5_x1051_y801_class0.png"]
    assert (disagreement["label"], disagreement["review_label"], disagreement["decision"]) == (0, "idc", "disagree")


OLD_SCHEMA = """
CREATE TABLE items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL UNIQUE,
    name TEXT, patient TEXT, x INTEGER, y INTEGER,
    format TEXT NOT NULL, image BLOB NOT NULL,
    p_idc REAL NOT NULL, label INTEGER NOT NULL, needs_review INTEGER NOT NULL,
    reason TEXT NOT NULL, model TEXT, created_at TEXT NOT NULL,
    decision TEXT, note TEXT, reviewer TEXT, reviewed_at TEXT
);
CREATE INDEX items_by_decision ON items (decision, id);
"""


def test_a_queue_from_before_the_label_is_migrated(station, flagging_classifier, tmp_path):
    """A review.sqlite3 of the first station (decisions only) gets the reviewer's label, derived from them."""
    db = tmp_path / "review.sqlite3"
    old = sqlite3.connect(db)
    old.executescript(OLD_SCHEMA)
    rows = [(1, "agree"), (0, "agree"), (1, "disagree"), (0, "disagree"), (1, "unsure"), (0, None)]
    for i, (label, decision) in enumerate(rows):
        old.execute("INSERT INTO items (sha256, name, format, image, p_idc, label, needs_review, reason, created_at, "
                    "decision, reviewed_at) VALUES (?, ?, 'PNG', ?, ?, ?, 1, 'review', '2024-01-02T03:04:05+00:00', "
                    "?, ?)", (f"h{i}", f"old{i}.png", image_bytes(colour=(i, 0, 0)), 0.45 + 0.02 * i, label,
                              decision, decision and "2024-01-02T03:05:00+00:00"))
    old.commit()
    old.close()
    client = station(classifier=flagging_classifier)
    items = client.get("/api/review/queue?status=all&order=oldest").get_json()["Items"]
    assert [(i["review_label"], i["decision"]) for i in items] == [
        ("idc", "agree"), ("no_idc", "agree"), ("no_idc", "disagree"), ("idc", "disagree"), ("unsure", "unsure"),
        (None, None)]
    export = client.get("/api/review/export.csv").get_data(as_text=True)
    assert [line.split(",")[5] for line in export.splitlines()[1:]] == ["1", "0", "0", "1", ""]  # the label column
    assert client.post("/api/review/items/6", json={"label": "idc"}).get_json()["Decision"] == "disagree"
    again = ReviewStore(db)  # a second opening finds it migrated: nothing changes
    assert again.item(3)["review_label"] == "no_idc" and again.counts() == {"pending": 0, "reviewed": 6}
    columns = [row[1] for row in sqlite3.connect(db).execute("PRAGMA table_info(items)")]
    assert columns.count("review_label") == 1


def test_the_pages_state_the_decision_rule_and_p_idc(station, flagging_classifier, tiny_classifier):
    client = station(classifier=flagging_classifier)
    for path in ("/", "/review"):
        text = client.get(path).get_data(as_text=True)
        assert "IDC when P(IDC) \u2265 0.5; needs review within \u00b10.499999 of it (0.000001 &lt; P(IDC) &lt; " \
               "0.999999)" in text, path
        assert "confidence" not in text.lower()
    assert 'data-threshold="0.5"' in client.get("/review").get_data(as_text=True)
    rule = f"IDC when P(IDC) \u2265 {tiny_classifier.threshold:.6f}".rstrip("0").rstrip(".")
    assert rule in station().get("/").get_data(as_text=True)
    assert "No model loaded: no decision rule" in station(classifier=None).get("/review").get_data(as_text=True)
    for asset in ("classify.js", "review.js"):
        assert b"onfidence" not in client.get(f"/ui/{asset}").data.replace(b"result.Confidence", b"")


WRITER = """
import sys
from idc.edge.web.store import QueueEntry, ReviewStore
store, worker = ReviewStore(sys.argv[1]), int(sys.argv[2])
for i in range(50):
    [item] = store.add([QueueEntry(f"{worker}-{i}".encode(), "PNG", 0.5, 0, True, f"w{worker}_{i}.png")])
    store.review(item, "no_idc", note=f"by {worker}", reviewer=f"writer {worker}")
"""


def test_four_concurrent_writer_processes_lose_nothing(tmp_path):
    db = tmp_path / "review.sqlite3"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(w)], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True) for w in range(4)]
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
    store = ReviewStore(db)
    assert store.counts() == {"pending": 0, "reviewed": 200}
    items = store.items("all", limit=1000)
    assert sorted(item["name"] for item in items) == sorted(f"w{w}_{i}.png" for w in range(4) for i in range(50))
    assert all(item["note"] == f"by {item['name'][1]}" for item in items)


def test_a_corrupt_database_is_a_clear_503_and_classification_goes_on(station, flagging_classifier, images,
                                                                      tmp_path, caplog):
    db = tmp_path / "review.sqlite3"
    db.write_bytes(b"this is not a database, it was overwritten by mistake" * 100)
    client = station(classifier=flagging_classifier)
    assert "corrupt" in caplog.text  # said at start-up
    for _ in range(3):  # every time, the same clear answer: no 500 loop
        assert_failed(client.get("/api/review/queue"), 503, "is corrupt")
        assert_failed(client.post("/api/review/items/1", json={"decision": "agree"}), 503, "move the file aside")
    infer = client.post("/api/infer", data=images["positive"], headers={"Content-Type": "image/png"})
    assert infer.status_code == 200 and infer.get_json()["NeedsReview"] is True
    assert "corrupt" in client.get("/api/health").get_json()["review"]["error"]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "idc_review_store_up 0.0" in metrics
    db.rename(tmp_path / "review.sqlite3.broken")  # the fix the message names: the next request works
    assert client.get("/api/review/queue").get_json()["Pending"] == 0


def test_a_locked_database_is_a_503_with_retry_after(station, images, tmp_path):
    client = station()
    client.get("/api/review/queue")  # creates the file
    client.application.extensions["idc"].review.timeout = 0.2
    holder = sqlite3.connect(tmp_path / "review.sqlite3", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        response = client.post("/api/review/items/1", json={"decision": "agree"})
        assert_failed(response, 503, "is locked by another process")
        assert response.headers["Retry-After"] == "5"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert_failed(client.post("/api/review/items/1", json={"decision": "agree"}), 404, "no review item")


def test_an_unwritable_database_path_is_a_clear_503(station, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    client = station(review_db=str(blocker / "review.sqlite3"))
    assert_failed(client.get("/api/review/queue"), 503, "review database")


def test_a_bad_export_is_a_clear_error(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ReviewExportError, match="not a review export"):
        read_csv(path)
    store = ReviewStore(tmp_path / "r.sqlite3")
    [item] = store.add([QueueEntry(b"\x89PNG fake", "PNG", 0.6, 1, True, "a.png")])
    store.review(item, "idc")
    from idc.core.review_export import write_csv

    with path.open("w", newline="") as f:
        write_csv(store.reviewed_with_images(), f)
    path.write_text(path.read_text().replace(",1,1,", ",1,1,", 1).replace("iVBOR", "AAAA"))
    with pytest.raises(ReviewExportError, match="line 2"):
        read_csv(path)


# --- the pages and the key ---

def test_pages_and_assets_are_served_offline(station):
    client = station()
    for path in ("/", "/review"):
        page = client.get(path)
        assert page.status_code == 200 and page.mimetype == "text/html"
        assert "default-src 'self'" in page.headers["Content-Security-Policy"]
        text = page.get_data(as_text=True)
        assert "http://" not in text and "https://" not in text  # nothing fetched from elsewhere
    for asset in ("style.css", "station.js", "classify.js", "review.js"):
        response = client.get(f"/ui/{asset}")
        assert response.status_code == 200 and b"http" not in response.data, asset


def test_with_a_key_the_pages_ask_for_it_once_and_hold_it_in_the_session(station, flagging_classifier, images):
    client = station(classifier=flagging_classifier, api_key="s3cret")
    for path in ("/", "/review"):
        page = client.get(path)
        assert page.status_code == 401 and 'method="post"' in page.get_data(as_text=True)
    wrong = client.post("/login", data={"key": "nope", "next": "/review"})
    assert wrong.status_code == 401 and "Wrong key" in wrong.get_data(as_text=True)
    right = client.post("/login", data={"key": "s3cret", "next": "/review"})
    assert right.status_code == 303 and right.headers["Location"] == "/review"
    cookie = right.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "s3cret" not in cookie
    assert client.get("/review").status_code == 200 and client.get("/api/review/queue").status_code == 200
    client.post("/api/infer", data=images["positive"], headers={"Content-Type": "image/png", "X-API-Key": "s3cret"})
    assert_failed(client.post("/api/review/items/1", json={"decision": "agree"}), 403, "X-IDC-Station")
    assert client.post("/api/review/items/1", json={"decision": "agree"}, headers={"X-IDC-Station": "1"}).status_code == 200
    assert client.post("/logout").status_code == 303
    assert client.get("/review").status_code == 401
    assert client.post("/login", data={"key": "s3cret", "next": "https://evil.example/"}).headers["Location"] == "/"


# --- /metrics ---

def samples(client) -> dict:
    text = client.get("/metrics").get_data(as_text=True)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_parse_and_move_with_requests(station, flagging_classifier, images):
    client = station(classifier=flagging_classifier)
    before = samples(client)
    infer_ok = ("idc_http_requests_total", (("endpoint", "/api/infer"), ("method", "POST"), ("status", "200")))
    assert infer_ok not in before and before[("idc_review_queue_length", ())] == 0
    assert before[("idc_mqtt_dropped_total", ())] == 7 and before[("idc_mqtt_queue_depth", ())] == 0
    for name in ("positive", "negative"):
        client.post("/api/infer", data=images[name], headers={"Content-Type": "image/png"})
    client.post("/api/infer", data=b"nope", headers={"Content-Type": "image/png"})
    batch(client, [("a.png", image_bytes(colour=(10, 200, 30)))])
    after = samples(client)
    assert after[infer_ok] == 2
    assert after[("idc_http_requests_total", (("endpoint", "/api/infer"), ("method", "POST"), ("status", "400")))] == 1
    assert after[("idc_inference_seconds_count", ())] == 3 and after[("idc_inference_seconds_sum", ())] > 0
    assert after[("idc_http_request_duration_seconds_count", (("endpoint", "/api/infer"),))] == 3
    assert after[("idc_review_queue_length", ())] == after[("idc_images_flagged_total", ())] >= 2
    assert after[("idc_http_requests_total", (("endpoint", "/metrics"), ("method", "GET"), ("status", "200")))] == 1
    info = [key for key in after if key[0] == "idc_model_info"]
    assert dict(info[0][1])["precision"] == "FP16"


# --- config ---

@pytest.mark.parametrize("changes, says", [
    ({"batch_max_files": 0}, "batch_max_files"),
    ({"batch_max_unzipped_bytes": -1}, "batch_max_unzipped_bytes"),
    ({"review_db": " "}, "review_db"),
    ({"review_all_idc": "yes"}, "review_all_idc"),
])
def test_review_station_config_is_validated(make_config, changes, says):
    with pytest.raises(ConfigError, match=says):
        make_config(Server=changes)


def test_default_review_db_is_in_the_model_directory():
    from idc.edge.web.store import review_db_path

    config = load_config()
    assert config.Server.review_db is None and review_db_path(config) == config.model_dir / "review.sqlite3"


# --- the export as extra training data (trainer.py --extra-labels) ---

def test_export_becomes_extra_training_data(tmp_path):
    from idc.core.bundle import ModelDir
    from idc.core.review_export import write_csv
    from idc.training.data import add_extra_labels, sort_dataset

    make_dataset(tmp_path / "raw", patients=5, per_class=3)
    model = ModelDir(tmp_path / "model", "DevCloudIDC")
    sort_dataset(tmp_path / "raw", model, validation_fraction=0.2, test_fraction=0.2, seed=1)
    train_patient = model.read_manifest("train")[0].patient
    test_patient = model.read_manifest("test")[0].patient
    store = ReviewStore(tmp_path / "review.sqlite3")
    patch = (tmp_path / "model" / model.read_manifest("train")[0].path.relative_to(model.root)).read_bytes()
    ids = store.add([QueueEntry(patch, "PNG", 0.6, 1, True, f"{train_patient}_idx5_x50_y100_class1.png"),
                     QueueEntry(patch + b"x", "PNG", 0.5, 0, True, f"{test_patient}_idx5_x0_y0_class0.png"),
                     QueueEntry(patch + b"y", "PNG", 0.5, 0, True, "upload.png")])
    for item_id, decision in zip(ids, ("disagree", "agree", "unsure")):
        store.review(item_id, decision=decision)  # as the first station's clients did
    export = tmp_path / "reviews.csv"
    with export.open("w", newline="") as f:
        assert write_csv(store.reviewed_with_images(), f) == 3
    before = len(model.read_manifest("train"))
    added, left_out = add_extra_labels(export, model)
    assert added == 1 and len(left_out) == 1 and "validation/test patient" in left_out[0]  # unsure: no label
    rows = model.read_manifest("train")
    assert len(rows) == before + 1
    new = rows[-1]
    assert (new.patient, new.x, new.y, new.label) == (train_patient, 50, 100, 0)  # disagree flipped 1 -> 0
    assert new.path.read_bytes() == patch and new.path.parent.name == "0"
    assert add_extra_labels(export, model)[0] == 0  # added once only


def test_trainer_has_the_extra_labels_option():
    done = subprocess.run([sys.executable, str(ROOT / "trainer.py"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "--extra-labels CSV" in done.stdout


def test_a_patients_zip_gets_the_bundles_slide_context_beside_patch_alone(station, tiny_project, tmp_path):
    import dataclasses

    from idc.core.bundle import Bundle
    from idc.core.context import with_context
    from idc.edge.engine import OpenVINOClassifier

    config, _ = tiny_project
    rule = {"radius": 1, "weight": 0.5, "threshold": 0.5, "validation_balanced_accuracy": 1.0}
    bundle = dataclasses.replace(Bundle.load(config.model.ir_dir("FP16")), slide_context=rule)
    with_rule = OpenVINOClassifier(config.model.ir_xml("FP16"), "CPU", bundle)
    data, names = patient_zip(tmp_path, per_class=4)
    body = batch(station(with_rule), data=data, content_type="application/zip").get_json()
    assert body["SlideContext"] == {"kind": "weighted", "radius": 1, "weight": 0.5, "threshold": 0.5}
    results = body["Results"]
    expected = with_context([r["Patient"] for r in results], [r["X"] for r in results], [r["Y"] for r in results],
                            [r["Confidence"] for r in results], 1, 0.5)
    assert [r["ContextConfidence"] for r in results] == pytest.approx(expected.tolist())
    assert [r["ContextResults"] for r in results] == [int(q >= 0.5) for q in expected]
    assert any(abs(r["ContextConfidence"] - r["Confidence"]) > 1e-3 for r in results)  # neighbours did count
    # streamed: the context comes as the last line; the model without a rule stays patch-alone
    streamed = batch(station(with_rule), data=data, content_type="application/zip", Accept="application/x-ndjson")
    last = json.loads(streamed.get_data(as_text=True).splitlines()[-1])
    assert last["SlideContext"]["weight"] == 0.5 and [c["File"] for c in last["Context"]] == names
    plain = batch(station(), data=data, content_type="application/zip").get_json()
    assert plain["SlideContext"] is None and "ContextConfidence" not in plain["Results"][0]
