"""The review station: the pages a pathologist uses, and the review queue they work through.

`ReviewStore` keeps the queue in SQLite (embedded, one file: `Server.review_db`, by default
`review.sqlite3` in the model directory): every patch the model flags for review (and, with
`Server.review_all_idc`, every IDC verdict) is stored with its image and verdict; a reviewer marks
it agree / disagree / unsure with an optional note and name. It survives restarts; several
processes may write to it at once (WAL journal, a busy timeout, one short transaction per write).
A database that is corrupt, locked for longer than the busy timeout or unwritable raises
ReviewStoreError with a message that says what to do; the API answers it with a JSON 503 (and
Retry-After when locked), never a 500, and /api/infer keeps classifying meanwhile.

Pages and endpoints (Blueprint `review_bp`)
- `GET /`: drop patches, or a zip of a patient's patches, see verdicts and the slide mosaic.
- `GET /review`: the queue. `POST /login` (form field `key`), `POST /logout`.
- `GET /api/review/queue?status=pending|reviewed|all&limit=&offset=`: items (without images).
- `GET /api/review/items/<id>/image`; `POST /api/review/items/<id>` with JSON
  `{"decision": "agree"|"disagree"|"unsure", "note": str, "reviewer": str}`.
- `GET /api/review/export.csv`: reviewed items as extra training data (idc.core.review_export).

With Server.api_key set, the pages answer a key form (401) until the key is posted once; the
browser then holds a session cookie (HttpOnly, SameSite=Strict, signed with a secret derived from
the key, so changing the key ends every session). The key never goes into a URL. API clients send
the key as for /api/infer (X-API-Key or Authorization: Bearer). A request authorised by the cookie
alone that changes something must carry the header `X-IDC-Station: 1`, which a cross-site form
cannot send.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import io
import logging
import queue as queues
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flask import Blueprint, Response, current_app, redirect, render_template, request, session

from idc.core.bundle import parse_patch_name
from idc.core.config import Config
from idc.core.errors import ApiError, ReviewStoreError
from idc.core.review_export import DECISIONS, write_csv
from idc.edge.api import ApiState

log = logging.getLogger(__name__)

REVIEW_DB_NAME = "review.sqlite3"
SESSION_HOURS = 12
MAX_NOTE = 2000
MAX_REVIEWER = 100
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "BMP": "image/bmp", "TIFF": "image/tiff"}
SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL UNIQUE,
    name TEXT, patient TEXT, x INTEGER, y INTEGER,
    format TEXT NOT NULL, image BLOB NOT NULL,
    p_idc REAL NOT NULL, label INTEGER NOT NULL, needs_review INTEGER NOT NULL,
    reason TEXT NOT NULL, model TEXT, created_at TEXT NOT NULL,
    decision TEXT, note TEXT, reviewer TEXT, reviewed_at TEXT
);
CREATE INDEX IF NOT EXISTS items_by_decision ON items (decision, id);
"""
COLUMNS = ("id", "sha256", "name", "patient", "x", "y", "format", "p_idc", "label", "needs_review", "reason",
           "model", "created_at", "decision", "note", "reviewer", "reviewed_at")


def review_db_path(config: Config) -> Path:
    """Server.review_db, or review.sqlite3 in the model directory when it is null."""
    server = config.Server
    return config.resolve(server.review_db) if server.review_db else config.model_dir / REVIEW_DB_NAME


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class QueueEntry:
    """A classified patch to put in the queue."""

    image: bytes
    format: str  # PNG, JPEG, BMP, TIFF
    p_idc: float
    label: int
    needs_review: bool
    name: str | None = None  # the upload's file name, if any (only used to show and to read coordinates)
    model: str = ""


def wants_review(label: int, needs_review: bool, review_all_idc: bool) -> bool:
    return bool(needs_review or (review_all_idc and label == 1))


class ReviewStore:
    """The review queue in one SQLite file; thread- and process-safe; see the module doc."""

    def __init__(self, path: str | Path, timeout: float = 5.0):
        self.path, self.timeout = Path(path), timeout
        self._ready = False
        self._init_lock = threading.Lock()

    # --- connections and errors ---

    def _explain(self, err: sqlite3.Error) -> ReviewStoreError:
        text = str(err)
        if "locked" in text or "busy" in text:
            why = (f"review database {self.path} is locked by another process (for over {self.timeout:g} s): "
                   "try again; if it stays locked, stop the program holding it")
        elif isinstance(err, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text
                                                         or "corrupt" in text):
            why = (f"review database {self.path} is corrupt ({text}): stop the server, move the file aside "
                   "(keep it: reviews may be recoverable with `sqlite3 FILE .recover`), and restart; a new "
                   "empty queue is created")
        elif "unable to open" in text or "readonly" in text or "read-only" in text or "disk" in text:
            why = (f"review database {self.path} cannot be written ({text}): check the folder exists and is "
                   "writable, and the disk has room (or set Server.review_db in confs.json)")
        else:
            why = f"review database {self.path} failed: {text}"
        return ReviewStoreError(why)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across a process crash, fast commits
        return conn

    def _init(self) -> None:
        with self._init_lock:
            if self._ready:
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ReviewStoreError(f"cannot create the folder of the review database {self.path}: "
                                       f"{err.strerror} (set Server.review_db in confs.json)") from None
            conn = self._connect()
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(SCHEMA)
                missing = set(COLUMNS) - {row[1] for row in conn.execute("PRAGMA table_info(items)")}
                if missing:
                    raise ReviewStoreError(f"review database {self.path} has a table 'items' without the "
                                           f"columns {sorted(missing)}: it is not this server's review queue; "
                                           "move it aside or set Server.review_db")
            finally:
                conn.close()
            self._ready = True

    @contextlib.contextmanager
    def _db(self, write: bool = False):
        try:
            self._init()
            conn = self._connect()
            try:
                if write:
                    conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no deadlock on upgrade
                yield conn
                if write:
                    conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            finally:
                conn.close()
        except sqlite3.Error as err:
            self._ready = False  # check the file again next time (it may have been replaced)
            raise self._explain(err) from None

    def check(self) -> None:
        """Open the database (creating it if absent) and read it; ReviewStoreError if it is unusable."""
        with self._db() as conn:
            conn.execute("SELECT count(*) FROM items").fetchone()

    # --- the queue ---

    def add(self, entries: list[QueueEntry], reason: str = "review") -> list[int]:
        """Queue patches (one transaction); a patch already stored (same bytes) is not added twice.
        Returns each entry's item id."""
        if not entries:
            return []
        now, ids = utc_now(), []
        with self._db(write=True) as conn:
            for entry in entries:
                digest = hashlib.sha256(entry.image).hexdigest()
                patch = parse_patch_name(Path(entry.name)) if entry.name else None
                why = "review" if entry.needs_review else "idc"
                conn.execute(
                    "INSERT INTO items (sha256, name, patient, x, y, format, image, p_idc, label, needs_review, "
                    "reason, model, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(sha256) DO NOTHING",
                    (digest, entry.name, patch.patient if patch else None, patch.x if patch else None,
                     patch.y if patch else None, entry.format, entry.image, float(entry.p_idc), int(entry.label),
                     int(entry.needs_review), why, entry.model, now))
                ids.append(conn.execute("SELECT id FROM items WHERE sha256 = ?", (digest,)).fetchone()[0])
        return ids

    def counts(self) -> dict:
        with self._db() as conn:
            pending, total = conn.execute(
                "SELECT count(*) FILTER (WHERE decision IS NULL), count(*) FROM items").fetchone()
        return {"pending": pending, "reviewed": total - pending}

    def items(self, status: str = "pending", limit: int = 100, offset: int = 0) -> list[dict]:
        """Queue items without their images: pending oldest first, reviewed newest first."""
        where, order = {"pending": ("decision IS NULL", "id"), "all": ("1", "id"),
                        "reviewed": ("decision IS NOT NULL", "reviewed_at DESC, id DESC")}[status]
        with self._db() as conn:
            rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM items WHERE {where} ORDER BY {order} "
                                "LIMIT ? OFFSET ?", (limit, offset)).fetchall()
        return [_item(row) for row in rows]

    def item(self, item_id: int) -> dict | None:
        with self._db() as conn:
            row = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM items WHERE id = ?", (item_id,)).fetchone()
        return _item(row) if row else None

    def image(self, item_id: int) -> tuple[bytes, str] | None:
        with self._db() as conn:
            row = conn.execute("SELECT image, format FROM items WHERE id = ?", (item_id,)).fetchone()
        return (bytes(row["image"]), row["format"]) if row else None

    def review(self, item_id: int, decision: str, note: str = "", reviewer: str = "") -> dict | None:
        """Record a decision (a later one replaces it); None when there is no such item."""
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)}")
        with self._db(write=True) as conn:
            changed = conn.execute("UPDATE items SET decision = ?, note = ?, reviewer = ?, reviewed_at = ? WHERE id = ?",
                                   (decision, note or None, reviewer or None, utc_now(), item_id)).rowcount
        return self.item(item_id) if changed else None

    def reviewed_with_images(self, page: int = 200):
        """Every reviewed item with its image, in id order (read page by page)."""
        last = 0
        while True:
            with self._db() as conn:
                rows = conn.execute(f"SELECT {', '.join(COLUMNS)}, image FROM items WHERE decision IS NOT NULL "
                                    "AND id > ? ORDER BY id LIMIT ?", (last, page)).fetchall()
            if not rows:
                return
            for row in rows:
                yield {**_item(row), "image": bytes(row["image"])}
            last = rows[-1]["id"]


def _item(row: sqlite3.Row) -> dict:
    item = {name: row[name] for name in COLUMNS}
    item["needs_review"] = bool(item["needs_review"])
    return item


class QueueWriter:
    """Queues /api/infer's flagged patches from a background thread, so that a single-image request never
    waits for SQLite. Bounded: when `capacity` patches wait (a locked or very slow database), more are
    dropped and logged. Readers of the queue call flush() first, so they see every patch already answered."""

    def __init__(self, store: ReviewStore, capacity: int = 1000):
        self.store, self.dropped = store, 0
        self._queue: queues.Queue = queues.Queue(capacity)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, entry: QueueEntry) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="review-queue-writer", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(entry)
        except queues.Full:
            self.dropped += 1
            log.error("review queue: %d patches waiting to be written; dropped one (%d so far)",
                      self._queue.maxsize, self.dropped)

    def flush(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._queue.unfinished_tasks

    def _run(self) -> None:
        while True:
            entries = [self._queue.get()]
            while len(entries) < 64:
                try:
                    entries.append(self._queue.get_nowait())
                except queues.Empty:
                    break
            try:
                self.store.add(entries)
            except ReviewStoreError as err:
                log.error("review queue: %d patches not queued: %s", len(entries), err)
            except Exception:  # the writer must survive anything
                log.exception("review queue: %d patches not queued", len(entries))
            finally:
                for _ in entries:
                    self._queue.task_done()


# --- the HTTP side ---

review_bp = Blueprint("review", __name__, static_folder="web/static", static_url_path="/ui",
                      template_folder="web/templates")


def _state() -> ApiState:
    return current_app.extensions["idc"]


def _store() -> ReviewStore:
    """The store, once the patches already answered by /api/infer are written (read your writes)."""
    flush_writes()
    return current_app.extensions["idc_review"]


def flush_writes(app=None) -> None:
    writer = (app or current_app).extensions.get("idc_review_writer")
    if writer is not None:
        writer.flush()


def _session_ok() -> bool:
    started = session.get("idc_since")
    return isinstance(started, (int, float)) and 0 <= time.time() - started < SESSION_HOURS * 3600


def check_access(changes: bool = False) -> None:
    """Raise 401 unless no key is set, the browser session holds it, or the request carries it.
    A change authorised by the session alone also needs the X-IDC-Station header (CSRF)."""
    state = _state()
    if not state.auth_required:
        return
    if _session_ok():
        if changes and request.headers.get("X-IDC-Station") != "1":
            raise ApiError(403, "send the header X-IDC-Station: 1 with changes made from the review station")
        return
    state.authorize(request.headers)


def _login_page(message: str, status: int, target: str | None = None):
    return render_template("login.html", message=message, next=_safe_next(target or request.path)), status


def _safe_next(path: str | None) -> str:
    return path if path in ("/", "/review") else "/"


def _page(template: str):
    state = _state()
    if state.auth_required and not _session_ok():
        return _login_page("This review station needs the server's API key.", 401)
    classifier = state.classifier
    return render_template(template, identity=state.identity, auth=state.auth_required,
                           threshold=getattr(classifier, "threshold", None),
                           max_upload_bytes=state.config.Server.max_upload_bytes,
                           batch_max_files=state.config.Server.batch_max_files)


@review_bp.get("/")
def index_page():
    return _page("index.html")


@review_bp.get("/review")
def review_page():
    return _page("review.html")


@review_bp.post("/login")
def login():
    state = _state()
    target = _safe_next(request.form.get("next"))
    if not state.auth_required:
        return redirect(target, 303)
    key = request.form.get("key", "")
    try:
        state.authorize({"X-API-Key": key})
    except ApiError:
        time.sleep(0.5)  # slows guessing; the key is compared in constant time
        return _login_page("Wrong key." if key else "Enter the key.", 401, target)
    session.clear()
    session["idc_since"] = time.time()
    return redirect(target, 303)


@review_bp.post("/logout")
def logout():
    session.clear()
    return redirect("/", 303)


def _store_call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ReviewStoreError as err:
        headers = {"Retry-After": "5"} if "locked" in str(err) else {}
        raise ApiError(503, str(err), headers) from None


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, not {raw!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be in {low}..{high}")
    return value


@review_bp.get("/api/review/queue")
def queue():
    check_access()
    status = request.args.get("status", "pending")
    if status not in ("pending", "reviewed", "all"):
        raise ApiError(400, "status must be pending, reviewed or all")
    limit, offset = _int_arg("limit", 100, 1, 1000), _int_arg("offset", 0, 0, 10**9)
    store = _store()
    items = _store_call(store.items, status, limit, offset)
    counts = _store_call(store.counts)
    return {"Response": "OK", "ResponseMessage": f"{counts['pending']} waiting for review",
            "Pending": counts["pending"], "Reviewed": counts["reviewed"], "Items": items}


@review_bp.get("/api/review/items/<int:item_id>/image")
def item_image(item_id: int):
    check_access()
    found = _store_call(_store().image, item_id)
    if found is None:
        raise ApiError(404, f"no review item {item_id}")
    data, image_format = found
    response = Response(data, mimetype=MIME.get(image_format, "application/octet-stream"))
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response


@review_bp.post("/api/review/items/<int:item_id>")
def review_item(item_id: int):
    check_access(changes=True)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(415 if not request.is_json else 400,
                       'send JSON: {"decision": "agree"|"disagree"|"unsure", "note": "...", "reviewer": "..."}')
    decision, note, reviewer = body.get("decision"), body.get("note") or "", body.get("reviewer") or ""
    if decision not in DECISIONS:
        raise ApiError(400, f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise ApiError(400, f"note must be text of at most {MAX_NOTE} characters")
    if not isinstance(reviewer, str) or len(reviewer) > MAX_REVIEWER:
        raise ApiError(400, f"reviewer must be a name of at most {MAX_REVIEWER} characters")
    item = _store_call(_store().review, item_id, decision, note.strip(), reviewer.strip())
    if item is None:
        raise ApiError(404, f"no review item {item_id}")
    log.info("review: item %d %s by %s", item_id, decision, reviewer.strip() or "(no name)")
    return {"Response": "OK", "ResponseMessage": f"item {item_id}: {decision}", "Item": item}


@review_bp.get("/api/review/export.csv")
def export_csv():
    check_access()
    store = _store()
    _store_call(store.check)  # fail as JSON before the CSV starts
    out = io.StringIO()
    _store_call(write_csv, store.reviewed_with_images(), out)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Response(out.getvalue(), mimetype="text/csv", headers={
        "Content-Disposition": f'attachment; filename="idc-reviews-{stamp}.csv"', "Cache-Control": "no-store"})


def queue_predictions(entries: list[QueueEntry]) -> list[int | None]:
    """Queue what the config says should be reviewed; never raises (a broken store must not fail
    classification): on failure it logs the store's message and returns None for each entry."""
    state, store = _state(), current_app.extensions.get("idc_review")
    if store is None:
        return [None] * len(entries)
    flush_writes()  # after the patches /api/infer answered before: ids in the order answered
    review_all_idc = state.config.Server.review_all_idc
    chosen = [i for i, e in enumerate(entries) if wants_review(e.label, e.needs_review, review_all_idc)]
    ids: list[int | None] = [None] * len(entries)
    if not chosen:
        return ids
    try:
        for i, item_id in zip(chosen, store.add([entries[i] for i in chosen])):
            ids[i] = item_id
    except ReviewStoreError as err:
        log.error("review queue: %s", err)
    return ids


def queue_later(entry: QueueEntry) -> None:
    """Queue one patch from the background writer if the config says it should be reviewed (/api/infer)."""
    state = _state()
    if wants_review(entry.label, entry.needs_review, state.config.Server.review_all_idc):
        current_app.extensions["idc_review_writer"].submit(entry)


def review_status() -> dict:
    """For /api/health: the queue's counts, or the store's error."""
    store = current_app.extensions.get("idc_review")
    if store is None:
        return {"enabled": False}
    flush_writes()
    try:
        return {"enabled": True, "database": str(store.path), **store.counts()}
    except ReviewStoreError as err:
        return {"enabled": True, "database": str(store.path), "error": str(err)}


def session_secret(api_key: str | None) -> bytes:
    """The session cookie's signing secret: derived from the API key (a new key ends every session)."""
    return hmac.new(b"idc-review-station-session", (api_key or "").encode("utf-8"), hashlib.sha256).digest()


def init_app(app, state: ApiState) -> ReviewStore:
    """Register the review station on `app`: its Blueprint, the queue's store, the session cookie."""
    config = state.config
    store = ReviewStore(review_db_path(config))
    if store.path.exists():  # say so at start-up; requests then answer the same message
        try:
            store.check()
        except ReviewStoreError as err:
            log.error("review queue unavailable: %s", err)
    app.extensions["idc_review"] = store
    app.extensions["idc_review_writer"] = QueueWriter(store)
    app.secret_key = session_secret(config.Server.api_key)
    app.config.update(SESSION_COOKIE_NAME="idc_session", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_SECURE=bool(config.Server.tls_cert))
    app.register_blueprint(review_bp)
    return store
