"""The review queue in SQLite, without Flask (the pages and API over it: idc.edge.web.review).

`ReviewStore` keeps the queue in one embedded file (`Server.review_db`, by default
`review.sqlite3` in the model directory): every patch the model flags for review (and, with
`Server.review_all_idc`, every IDC verdict) is stored with its image and verdict; a reviewer sets
its label (IDC / no IDC / unsure; `decision`, agree / disagree / unsure, follows from it and the
model's verdict) with an optional note and name. A tile of a whole slide (idc.edge.web.slides)
also keeps where it is on its slide (`slide`, `slide_x`, `slide_y`, `slide_size`: level-0 pixels),
so the station links it to the slide's viewer and back. It survives restarts; several
processes may write to it at once (WAL journal, a busy timeout, one short transaction per write).
A database that is corrupt, locked for longer than the busy timeout or unwritable raises
ReviewStoreError with a message that says what to do. `QueueWriter` queues single-image results
from a background thread, so /api/infer never waits for SQLite.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import queue as queues
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from idc.core.bundle import parse_patch_name
from idc.core.config import Config
from idc.core.errors import ReviewStoreError
from idc.core.review_export import DECISIONS, LABELS, decision_of_label, label_of_decision

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL UNIQUE,
    name TEXT, patient TEXT, x INTEGER, y INTEGER,
    format TEXT NOT NULL, image BLOB NOT NULL,
    p_idc REAL NOT NULL, label INTEGER NOT NULL, needs_review INTEGER NOT NULL,
    reason TEXT NOT NULL, model TEXT, created_at TEXT NOT NULL,
    decision TEXT, note TEXT, reviewer TEXT, reviewed_at TEXT, review_label TEXT,
    slide TEXT, slide_x INTEGER, slide_y INTEGER, slide_size INTEGER
);
CREATE INDEX IF NOT EXISTS items_by_decision ON items (decision, id);
"""
# `label` is the model's verdict (1 IDC, 0 no IDC); `review_label` the reviewer's (LABELS), null while pending;
# `decision` (DECISIONS) follows from the two. A slide's tile: `slide` (its id on the Slides page), the tile's
# level-0 x, y and side; its `patient` is the slide id, so the patient filter selects a slide's tiles.
COLUMNS = ("id", "sha256", "name", "patient", "x", "y", "format", "p_idc", "label", "needs_review", "reason",
           "model", "created_at", "decision", "note", "reviewer", "reviewed_at", "review_label",
           "slide", "slide_x", "slide_y", "slide_size")
# A queue written before the reviewer set the label has no review_label: added, and derived from the decision.
MIGRATE_REVIEW_LABEL = (
    "ALTER TABLE items ADD COLUMN review_label TEXT",
    "UPDATE items SET review_label = CASE decision WHEN 'unsure' THEN 'unsure' "
    "WHEN 'agree' THEN (CASE WHEN label = 1 THEN 'idc' ELSE 'no_idc' END) "
    "WHEN 'disagree' THEN (CASE WHEN label = 1 THEN 'no_idc' ELSE 'idc' END) END WHERE decision IS NOT NULL",
)
# A queue written before whole slides has no slide columns: added, empty (its items are patches).
MIGRATE_SLIDE = tuple(f"ALTER TABLE items ADD COLUMN {column}"
                      for column in ("slide TEXT", "slide_x INTEGER", "slide_y INTEGER", "slide_size INTEGER"))
ORDERS = {  # the queue's orders: ORDER BY, with the threshold as the first parameter of "uncertain"
    "uncertain": "abs(p_idc - ?), id",  # closest to the threshold (most uncertain) first
    "oldest": "id",
    "newest": "id DESC",
    "reviewed": "reviewed_at IS NULL, reviewed_at DESC, id DESC",  # latest review first
}
STATUSES = {"pending": "decision IS NULL", "reviewed": "decision IS NOT NULL", "all": "1"}


def review_db_path(config: Config) -> Path:
    """Server.review_db, or review.sqlite3 in the model directory when it is null."""
    server = config.Server
    return config.resolve(server.review_db) if server.review_db else config.model.review_db


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
    slide: str | None = None  # a whole slide's tile: the slide's id, and the tile's level-0 x, y and side
    slide_x: int | None = None
    slide_y: int | None = None
    slide_size: int | None = None

    @property
    def reason(self) -> str:
        """Why it is queued: "review" (close to the threshold) or "idc" (Server.review_all_idc)."""
        return "review" if self.needs_review else "idc"


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
                self._migrate(conn)
                missing = set(COLUMNS) - {row[1] for row in conn.execute("PRAGMA table_info(items)")}
                if missing:
                    raise ReviewStoreError(f"review database {self.path} has a table 'items' without the "
                                           f"columns {sorted(missing)}: it is not this server's review queue; "
                                           "move it aside or set Server.review_db")
            finally:
                conn.close()
            self._ready = True

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring a queue made by an older server up to date (once, under the write lock: another process may
        be migrating the same file): add review_label, its reviewed rows' labels derived from their
        decisions; add the slide columns, empty."""
        def columns():
            return {row[1] for row in conn.execute("PRAGMA table_info(items)")}

        if {"review_label", "slide"} <= columns() or not {"decision", "label"} <= columns():
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            if "review_label" not in columns():
                for statement in MIGRATE_REVIEW_LABEL:
                    conn.execute(statement)
                log.info("review database %s: added the reviewer's label, derived from %d decisions", self.path,
                         conn.execute("SELECT count(*) FROM items WHERE decision IS NOT NULL").fetchone()[0])
            if "slide" not in columns():
                for statement in MIGRATE_SLIDE:
                    conn.execute(statement)
                log.info("review database %s: added the slide columns (whole slides' tiles)", self.path)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

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

    def add(self, entries: list[QueueEntry]) -> list[int]:
        """Queue patches (one transaction); a patch already stored (same bytes) is not added twice.
        Returns each entry's item id."""
        if not entries:
            return []
        now, ids = utc_now(), []
        with self._db(write=True) as conn:
            for entry in entries:
                digest = hashlib.sha256(entry.image).hexdigest()
                if entry.slide is not None:  # a slide's tile: the slide is its patient, x, y its place on it
                    patient, x, y = entry.slide, entry.slide_x, entry.slide_y
                else:
                    patch = parse_patch_name(Path(entry.name)) if entry.name else None
                    patient, x, y = (patch.patient, patch.x, patch.y) if patch else (None, None, None)
                conn.execute(
                    "INSERT INTO items (sha256, name, patient, x, y, format, image, p_idc, label, needs_review, "
                    "reason, model, created_at, slide, slide_x, slide_y, slide_size) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(sha256) DO NOTHING",
                    (digest, entry.name, patient, x, y, entry.format, entry.image, float(entry.p_idc),
                     int(entry.label), int(entry.needs_review), entry.reason, entry.model, now,
                     entry.slide, entry.slide_x, entry.slide_y, entry.slide_size))
                ids.append(conn.execute("SELECT id FROM items WHERE sha256 = ?", (digest,)).fetchone()[0])
        return ids

    def counts(self) -> dict:
        with self._db() as conn:
            pending, total = conn.execute(
                "SELECT count(*) FILTER (WHERE decision IS NULL), count(*) FROM items").fetchone()
        return {"pending": pending, "reviewed": total - pending}

    @staticmethod
    def _where(status: str, needs_review: bool, disagreements: bool, patient: str | None,
               item: int | None = None) -> tuple[str, list]:
        clauses, params = [STATUSES[status]], []
        if item is not None:
            clauses.append("id = ?")
            params.append(item)
        if needs_review:
            clauses.append("needs_review = 1")
        if disagreements:  # reviewed, and the reviewer's label is not the model's
            clauses.append("review_label IN ('idc', 'no_idc') AND "
                           "review_label <> CASE WHEN label = 1 THEN 'idc' ELSE 'no_idc' END")
        if patient is not None:
            clauses.append("patient = ?")
            params.append(patient)
        return " AND ".join(clauses), params

    def items(self, status: str = "pending", limit: int = 100, offset: int = 0, *, order: str = "uncertain",
              threshold: float = 0.5, needs_review: bool = False, disagreements: bool = False,
              patient: str | None = None, item: int | None = None) -> list[dict]:
        """Queue items without their images, `order` (ORDERS; "uncertain": |p_idc - threshold| ascending),
        filtered: status (pending, reviewed, all), flagged by the review band only, disagreements only, one
        patient (or slide) only, one item only."""
        where, params = self._where(status, needs_review, disagreements, patient, item)
        ordering = ORDERS[order]
        with self._db() as conn:
            rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM items WHERE {where} ORDER BY {ordering} "
                                "LIMIT ? OFFSET ?",
                                (*params, *([float(threshold)] if order == "uncertain" else []), limit, offset)
                                ).fetchall()
        return [_item(row) for row in rows]

    def matching(self, status: str = "pending", *, needs_review: bool = False, disagreements: bool = False,
                 patient: str | None = None, item: int | None = None) -> int:
        """How many items `items` would list with these filters and no limit."""
        where, params = self._where(status, needs_review, disagreements, patient, item)
        with self._db() as conn:
            return conn.execute(f"SELECT count(*) FROM items WHERE {where}", params).fetchone()[0]

    def patients(self) -> list[str]:
        """The patients of the queued items (from Kaggle patch names; a slide's tiles: the slide), sorted."""
        with self._db() as conn:
            rows = conn.execute("SELECT DISTINCT patient FROM items WHERE patient IS NOT NULL").fetchall()
        return sorted((row[0] for row in rows), key=lambda p: (not p.isdigit(), int(p) if p.isdigit() else 0, p))

    def item(self, item_id: int) -> dict | None:
        with self._db() as conn:
            row = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM items WHERE id = ?", (item_id,)).fetchone()
        return _item(row) if row else None

    def image(self, item_id: int) -> tuple[bytes, str] | None:
        with self._db() as conn:
            row = conn.execute("SELECT image, format FROM items WHERE id = ?", (item_id,)).fetchone()
        return (bytes(row["image"]), row["format"]) if row else None

    def review(self, item_id: int, label: str | None = None, note: str = "", reviewer: str = "", *,
               decision: str | None = None) -> dict | None:
        """Record the reviewer's label (LABELS; a later review replaces it), or, as the first station's
        clients did, a decision (DECISIONS), converted to the label against the model's verdict. The item
        keeps both. None when there is no such item."""
        if (label is None) == (decision is None):
            raise ValueError("give a label or a decision")
        if label is not None and label not in LABELS:
            raise ValueError(f"label must be one of {', '.join(LABELS)}")
        if decision is not None and decision not in DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)}")
        with self._db(write=True) as conn:
            row = conn.execute("SELECT label FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                return None
            if label is None:
                label = label_of_decision(decision, row["label"])
            conn.execute("UPDATE items SET review_label = ?, decision = ?, note = ?, reviewer = ?, reviewed_at = ? "
                         "WHERE id = ?", (label, decision_of_label(label, row["label"]), note or None,
                                          reviewer or None, utc_now(), item_id))
        return self.item(item_id)

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
