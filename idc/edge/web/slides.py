"""The review station's Slides page: whole-slide images analysed by the server, one at a time, and
shown in a deep-zoom viewer with the P(IDC) overlay (docs/review-station.md, docs/api.md).

- `SlideWorker`: one background thread and a FIFO of jobs, each slide through
  idc.slides.job.process_slide with the server's own classifier (the one /api/infer uses). Jobs
  come from uploads and from the watch folder (`Slides.watch_dir`, polled every `poll_seconds`;
  a file waits until its size and mtime stay the same for one poll, so a scanner still writing
  it is not read half-way). Whatever a job raises marks that job failed, with the message, and
  the worker goes on. A done slide's needs-review tiles go into the review queue
  (`Slides.review_flagged`) with their place on the slide.
- On disk, under `Config.slides_dir`: one folder per slide (its outputs: idc.slides.outputs, plus
  `source.json`, what was analysed, and `review.json`, its tiles' review items), and `.uploads/`
  (the uploaded files; slide ids never start with a dot). After a restart the folders are the
  done slides, a watched file whose size and mtime match its folder is not analysed again, and
  an upload without a result is queued again.
- The blueprint: `GET /slides` (list and upload), `GET /slides/<id>` (viewer), the Deep Zoom
  image `GET /slides/<id>.dzi` and its tiles, and `/api/slides...` (list, upload, one slide, its
  files). Uploads are streamed to disk in chunks, never held in memory: slides are gigabytes,
  so this route has its own limit, `Slides.max_upload_bytes`.
"""

from __future__ import annotations

import atexit
import collections
import csv
import io
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from flask import Blueprint, Response, abort, g, request, send_file
from PIL import Image
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser

from idc.core.config import Config
from idc.core.errors import ApiError, ReviewStoreError, SlideError
from idc.core.files import write_text_atomically
from idc.edge.web.auth import check_access
from idc.edge.web.protocol import NO_MODEL, SLIDES
from idc.edge.web.review import login_needed, render_page
from idc.edge.web.state import current_state
from idc.edge.web.store import QueueEntry, ReviewStore, utc_now
from idc.slides.analysis import Stopped
from idc.slides.job import process_slide, slide_id
from idc.slides.outputs import FILES
from idc.slides.reader import SLIDE_SUFFIXES, SlideReader, is_slide

log = logging.getLogger(__name__)

UPLOADS = ".uploads"  # under slides_dir; a slide id never starts with a dot, so no slide's folder is this
SOURCE = "source.json"  # in a slide's folder: the analysed file (path, size, mtime), written last: "done"
REVIEW = "review.json"  # in a slide's folder: its needs-review tiles' review items
# Formats made of several files: an upload is one file, so these come through the watch folder only.
MULTI_FILE = (".mrxs", ".vms", ".vmu")
CHUNK = 1 << 20  # bytes read and written at a time while receiving an upload
QUEUE_BATCH = 64  # flagged tiles read and queued for review at a time
TILE_SIZE, OVERLAP = 254, 1  # Deep Zoom tiles: 256 px with their overlap, as OpenSlide's own viewer
JPEG_QUALITY = 80
OPEN_SLIDES = 4  # slides kept open for the viewer
MAX_ID = 100  # characters of a slide id (a folder's name): long file names are cut
STOP_SECONDS = 30  # how long close() waits for the job in progress to reach its next batch
FILE_TYPES = {".csv": "text/csv", ".png": "image/png", ".geojson": "application/geo+json",
              ".json": "application/json"}

bp = Blueprint("slides", __name__)


@dataclass
class SlideJob:
    """One slide: where it comes from and how far its analysis is."""

    id: str
    file: str  # the file name as given (uploaded or found)
    path: Path  # the file analysed
    via: str  # "upload" or "watch"
    status: str = "queued"  # queued, running, done, failed
    done: int = 0  # tiles classified
    total: int = 0  # tiles to classify (0 until the tissue is found)
    message: str = ""
    size: int = 0  # of the file when queued (with mtime_ns: the watch folder's key)
    mtime_ns: int = 0
    queued_at: str = field(default_factory=utc_now)
    started_at: str | None = None
    finished_at: str | None = None
    figures: dict | None = None  # the summary's main numbers, once done
    flagged: tuple | None = None  # (summary mtime, [flagged tiles]): read from the folder once

    def public(self) -> dict:
        return {"id": self.id, "file": self.file, "source": self.via, "status": self.status,
                "progress": {"done": self.done, "total": self.total}, "message": self.message,
                "queued_at": self.queued_at, "started_at": self.started_at, "finished_at": self.finished_at,
                "viewer": f"/slides/{self.id}", "figures": self.figures}


def figures(summary: dict) -> dict:
    """What the Slides list shows of a slide's summary (idc.slides.outputs.summary)."""
    return {"tiles": summary["tiles"]["classified"], "tissue_mm2": summary["tissue"]["area_mm2"],
            "idc_tiles": summary["idc_tiles"], "idc_area_mm2": summary["idc_area_mm2"],
            "idc_share": summary["idc_share"], "tiles_to_review": summary["tiles_to_review"],
            "seconds": summary["seconds"].get("total")}


class SlideWorker:
    """The slides' FIFO and the one thread that analyses them; see the module doc. Thread-safe."""

    def __init__(self, config: Config, classifier, review: ReviewStore, model_label: str = ""):
        settings = config.Slides
        self.config, self.settings, self.classifier = config, settings, classifier
        self.review, self.model_label = review, model_label
        self.root = config.slides_dir
        self.uploads = self.root / UPLOADS
        self.watch_dir = config.resolve(settings.watch_dir) if settings.watch_dir else None
        self._jobs: dict[str, SlideJob] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._processed: set[tuple[str, int, int]] = set()  # watched files' (path, size, mtime_ns) queued once
        self._last_seen: dict[str, tuple[str, int, int]] = {}  # the watch folder at the last poll
        self._next_poll = 0.0
        self._watch_missing = False
        self._viewer = DeepZoomCache()

    # --- start and stop ---

    def start(self) -> SlideWorker:
        """Read the slides already done from disk, queue the uploads left unfinished, and start the
        thread when there is work (a watch folder or a queued upload) and a model to do it."""
        try:
            with self._cond:
                self._load()
        except OSError as err:
            log.error("slides: cannot read %s (%s): the Slides page lists no earlier slides", self.root, err)
        if self.watch_dir is not None and self.classifier is None:
            log.warning("slides: no model loaded: the watch folder %s is not watched", self.watch_dir)
        if self.classifier is not None and (self.watch_dir is not None or self._queue):
            self._ensure_thread()
        return self

    def _ensure_thread(self) -> None:
        with self._cond:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="slide-worker", daemon=True)
                self._thread.start()
                # server.py exits without closing the app: stop the job in progress before the interpreter ends.
                atexit.register(self.close)

    def close(self) -> None:
        """Stop the thread: the job in progress stops at its next batch of tiles and is queued again
        (an upload is analysed again after a restart, a watched file found again)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(STOP_SECONDS)
            if thread.is_alive():
                log.warning("slides: the job in progress did not stop within %d s", STOP_SECONDS)
            atexit.unregister(self.close)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict:
        """For /api/health: the worker, the watch folder, the slides by status and the one in progress."""
        with self._cond:
            jobs = list(self._jobs.values())
        current = next((job for job in jobs if job.status == "running"), None)
        return {"worker_running": self.running, "watch_dir": str(self.watch_dir) if self.watch_dir else None,
                "slides": dict(collections.Counter(job.status for job in jobs)),
                "in_progress": None if current is None else {"id": current.id, "done": current.done,
                                                              "total": current.total}}

    # --- what is on disk ---

    def _load(self) -> None:
        if not self.root.is_dir():
            return
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not (folder / SOURCE).is_file():
                continue  # the uploads, unfinished outputs, or a folder written by the CLI (no source known)
            try:
                source = json.loads((folder / SOURCE).read_text())
                summary = json.loads((folder / FILES["summary"]).read_text())
                job = SlideJob(folder.name, source["file"], Path(source["path"]), source["via"], "done",
                               size=source["size"], mtime_ns=source["mtime_ns"], queued_at=source["queued_at"],
                               started_at=source["started_at"], finished_at=source["finished_at"],
                               figures=figures(summary))
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.warning("slides: %s is not a slide's result (%s): left out", folder, err)
                continue
            job.done = job.total = job.figures["tiles"]
            self._jobs[job.id] = job
            if job.via == "watch":
                self._processed.add((str(job.path), job.size, job.mtime_ns))
        if self.uploads.is_dir():
            for path in sorted(self.uploads.iterdir()):
                if path.name.startswith("."):  # an upload cut off by a stop, never validated
                    shutil.rmtree(path, ignore_errors=True)
                elif path.stem not in self._jobs and is_slide(path):
                    stat = path.stat()
                    self._add(SlideJob(path.stem, path.name, path, "upload", size=stat.st_size,
                                       mtime_ns=stat.st_mtime_ns, message="queued again after a restart"))

    def _unique_id(self, name: str) -> str:
        """The slide id of a file name, made unique among the jobs, folders and uploads (-2, -3, ...)."""
        base = slide_id(name)[:MAX_ID]
        taken = set(self._jobs)
        if self.root.is_dir():
            taken |= {p.name for p in self.root.iterdir()}
        if self.uploads.is_dir():
            taken |= {p.stem for p in self.uploads.iterdir()}
        candidate, n = base, 1
        while candidate in taken:
            n += 1
            candidate = f"{base}-{n}"
        return candidate

    def _add(self, job: SlideJob) -> None:
        """Queue `job` (the caller holds the lock)."""
        self._jobs[job.id] = job
        self._queue.append(job.id)
        self._cond.notify_all()

    # --- jobs from outside ---

    def jobs(self) -> list[dict]:
        with self._cond:
            return [job.public() for job in self._jobs.values()]

    def job(self, slide: str) -> SlideJob | None:
        with self._cond:
            return self._jobs.get(slide)

    def check_upload(self, name: str) -> str:
        """The suffix of an upload's file name; ApiError when it is no slide format an upload can be."""
        suffix = Path(name).suffix.lower()
        if suffix in MULTI_FILE:
            raise ApiError(415, f"{name}: {suffix} slides are several files; an upload is one: put the slide "
                                "(its file and its folder) in the watch folder (Slides.watch_dir) instead")
        if suffix not in SLIDE_SUFFIXES:
            raise ApiError(415, f"{name}: not a slide file name; send one of {', '.join(SLIDE_SUFFIXES)} "
                                "(Aperio .svs, Hamamatsu .ndpi, generic tiled TIFF, ...)")
        return suffix

    def accept_upload(self, received: Path, name: str) -> dict:
        """Validate an upload received at `received` (a file named `name`) and queue it; ApiError (4xx)
        when OpenSlide cannot open it or it has no scale. The caller removes `received` on error."""
        suffix = self.check_upload(name)
        if received.stat().st_size == 0:
            raise ApiError(400, f"{name}: empty upload: send the slide file's bytes")
        bundle = self.classifier.bundle
        try:  # what the job would find first: readable, a scale, at least one tile
            SlideReader(received, bundle.microns_per_pixel, bundle.patch_pixels, self.settings.default_mpp).close()
        except SlideError as err:
            raise ApiError(400, str(err)) from None
        with self._cond:
            job_id = self._unique_id(name)
            path = self.uploads / f"{job_id}{suffix}"
            received.replace(path)
            stat = path.stat()
            job = SlideJob(job_id, Path(name.replace("\\", "/")).name, path, "upload", size=stat.st_size,
                           mtime_ns=stat.st_mtime_ns)
            self._add(job)
            position = len(self._queue)
        self._ensure_thread()
        log.info("slides: %s uploaded (%d bytes) as %s, queued at %d", name, stat.st_size, job_id, position)
        return job.public() | {"position": position}

    # --- the watch folder ---

    def poll(self) -> None:
        """Queue each slide of the watch folder whose size and mtime are those of the last poll (no
        longer being written) and that was not queued in that state before."""
        if self.watch_dir is None:
            return
        try:
            entries = [entry for entry in os.scandir(self.watch_dir)
                       if not entry.name.startswith(".") and is_slide(entry.name) and entry.is_file()]
        except OSError as err:
            if not self._watch_missing:
                log.warning("slides: cannot read the watch folder %s (%s): trying again every %g s",
                            self.watch_dir, err.strerror or err, self.settings.poll_seconds)
            self._watch_missing = True
            return
        self._watch_missing = False
        seen = {}
        for entry in entries:
            try:
                stat = entry.stat()
            except OSError:  # gone since the listing
                continue
            key = (entry.path, stat.st_size, stat.st_mtime_ns)
            seen[entry.path] = key
            if key not in self._processed and self._last_seen.get(entry.path) == key:
                self._queue_watched(Path(entry.path), key)
        self._last_seen = seen

    def _queue_watched(self, path: Path, key: tuple[str, int, int]) -> None:
        with self._cond:
            job = next((j for j in self._jobs.values() if j.via == "watch" and j.path == path), None)
            if job is not None and job.status == "running":
                return  # changed while being analysed: queued once this run ends (the next poll)
            self._processed.add(key)
            if job is None:
                job = SlideJob(self._unique_id(path.name), path.name, path, "watch")
            elif job.status == "queued":
                self._queue.remove(job.id)
            else:  # done or failed before: the file changed, analyse it again
                job.status, job.done, job.total, job.figures = "queued", 0, 0, None
                job.message, job.queued_at = "changed: analysed again", utc_now()
                job.started_at = job.finished_at = None
            job.size, job.mtime_ns = key[1], key[2]
            self._add(job)
        log.info("slides: %s found in the watch folder: queued as %s", path.name, job.id)

    # --- the thread ---

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._poll_if_due()
                job = self._next()
                if job is not None:
                    self._process(job)
            except Exception:  # the worker must outlive any fault: log it, go on
                log.exception("slides: the worker failed; it goes on")
                self._stop.wait(1.0)

    def _poll_if_due(self) -> None:
        if self.watch_dir is not None and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.settings.poll_seconds
            self.poll()

    def _next(self) -> SlideJob | None:
        with self._cond:
            if not self._queue and not self._stop.is_set():
                wait = self._next_poll - time.monotonic() if self.watch_dir is not None else None
                self._cond.wait(None if wait is None else max(0.0, wait))
            if not self._queue or self._stop.is_set():
                return None
            job = self._jobs[self._queue.popleft()]
            job.status, job.started_at, job.message = "running", utc_now(), "finding the tissue"
            return job

    def _should_stop(self) -> bool:
        """Between batches of tiles: poll the watch folder when due (new slides show as queued while
        a long one runs), and stop when the server does."""
        self._poll_if_due()
        return self._stop.is_set()

    def _progress(self, job: SlideJob, done: int, total: int) -> None:
        job.done, job.total, job.message = done, total, f"classified {done} of {total} tissue tiles"

    def _process(self, job: SlideJob) -> None:
        log.info("slides: analysing %s (%s)", job.id, job.path)
        started = time.perf_counter()
        try:
            summary, result, folder = process_slide(
                self.config, self.classifier, job.path, folder=self.root / job.id,
                progress=lambda done, total: self._progress(job, done, total), should_stop=self._should_stop)
            message = self._queue_flagged(job, result, folder) if self.settings.review_flagged else ""
            finished = utc_now()
            source = {"file": job.file, "path": str(job.path), "via": job.via, "size": job.size,
                      "mtime_ns": job.mtime_ns, "queued_at": job.queued_at, "started_at": job.started_at,
                      "finished_at": finished}
            write_text_atomically(folder / SOURCE, json.dumps(source, indent=1))
        except Stopped:
            with self._cond:
                job.status, job.done, job.total, job.started_at = "queued", 0, 0, None
                job.message = "stopped with the server: analysed again after a restart"
                self._queue.appendleft(job.id)
            return
        except Exception as err:
            if isinstance(err, SlideError):
                message = str(err)
            else:
                log.exception("slides: %s failed", job.id)
                message = f"the analysis failed ({type(err).__name__}: {err}); the fault is logged on the server"
            with self._cond:
                job.status, job.message, job.finished_at, job.flagged = "failed", message, utc_now(), None
            if job.via == "upload":  # nothing to look at, and a restart would only fail it again
                job.path.unlink(missing_ok=True)
            log.warning("slides: %s failed: %s", job.id, message)
            return
        with self._cond:
            job.status, job.finished_at, job.figures, job.flagged = "done", finished, figures(summary), None
            job.done = job.total = len(result.tiles)
            job.message = message or f"done in {time.perf_counter() - started:.1f} s"
        log.info("slides: %s done: %d tiles, %d IDC, %d to review", job.id, len(result.tiles),
                 summary["idc_tiles"], summary["tiles_to_review"])

    def _queue_flagged(self, job: SlideJob, result, folder: Path) -> str:
        """Put the slide's needs-review tiles into the review queue (their model-scale pixels, the slide's
        answer, their place) and record their items in review.json. Returns a note when they are not."""
        flagged = [i for i, review in enumerate(result.needs_review) if review]
        bundle, slide = self.classifier.bundle, result.slide
        items = []
        try:
            with SlideReader(job.path, bundle.microns_per_pixel, bundle.patch_pixels, slide["mpp"],
                             tuple(slide["origin"])) as reader:
                for start in range(0, len(flagged), QUEUE_BATCH):
                    if self._stop.is_set():
                        raise Stopped(f"{job.id}: stopped while queueing its tiles for review")
                    batch = flagged[start:start + QUEUE_BATCH]
                    tiles = [result.tiles[i] for i in batch]
                    entries = []
                    for i, tile, pixels in zip(batch, tiles, reader.read(tiles)):
                        out = io.BytesIO()
                        Image.fromarray(pixels).save(out, "PNG")
                        entries.append(QueueEntry(out.getvalue(), "PNG", float(result.p_idc[i]), int(result.idc[i]),
                                                  True, f"{job.id}_x{tile.x}_y{tile.y}.png", self.model_label,
                                                  slide=job.id, slide_x=tile.x, slide_y=tile.y, slide_size=tile.size))
                    ids = self.review.add(entries)
                    items += [[tile.x, tile.y, item] for tile, item in zip(tiles, ids)]
        except (ReviewStoreError, SlideError) as err:
            log.error("slides: %s: its tiles to review are not in the review queue: %s", job.id, err)
            return f"done, but its {len(flagged)} tiles to review are not in the review queue: {err}"
        finally:
            if items:
                write_text_atomically(folder / REVIEW, json.dumps({"items": items}, indent=1))
        return ""

    # --- what the pages read ---

    def flagged(self, job: SlideJob) -> list[dict]:
        """A done slide's needs-review tiles (tiles.csv) with their review items (review.json, or null)."""
        folder = self.root / job.id
        stamp = (folder / FILES["summary"]).stat().st_mtime_ns
        cached = job.flagged
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            items = {(x, y): item for x, y, item in json.loads((folder / REVIEW).read_text())["items"]}
        except FileNotFoundError:
            items = {}
        tiles = []
        with (folder / FILES["tiles"]).open(newline="") as f:
            for row in csv.DictReader(f):
                if row["needs_review"] == "1":
                    x, y = int(row["x"]), int(row["y"])
                    tiles.append({"x": x, "y": y, "size": int(row["width"]), "p_idc": float(row["p_idc"]),
                                  "idc": int(row["idc"]), "item": items.get((x, y))})
        job.flagged = (stamp, tiles)
        return tiles

    def deep_zoom(self, job: SlideJob):
        return self._viewer.get(job.path)


class DeepZoomCache:
    """The viewer's open slides: a few OpenSlide handles and their DeepZoomGenerator, least recently used
    dropped first (closed by the garbage collector once no request still reads it). Keyed by the
    file's path, size and mtime, so a file replaced in the watch folder is opened anew."""

    def __init__(self, size: int = OPEN_SLIDES):
        self.size = size
        self._lock = threading.Lock()
        self._open: collections.OrderedDict = collections.OrderedDict()

    def get(self, path: Path):
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        try:
            stat = path.stat()
        except OSError:
            raise ApiError(404, f"the slide's file {path.name} is no longer there: its results remain, "
                                "but the viewer needs the file") from None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:  # opening takes milliseconds: the lock keeps one handle per file
            if key in self._open:
                self._open.move_to_end(key)
                return self._open[key]
            try:
                generator = DeepZoomGenerator(openslide.OpenSlide(str(path)), tile_size=TILE_SIZE, overlap=OVERLAP,
                                              limit_bounds=False)
            except (openslide.OpenSlideError, OSError) as err:
                raise ApiError(422, f"{path.name} cannot be opened for viewing: {str(err)[:200]}") from None
            self._open[key] = generator
            while len(self._open) > self.size:
                self._open.popitem(last=False)
            return generator


# --- the routes ---

def _worker() -> SlideWorker:
    return current_state().slides


def _job(slide: str) -> SlideJob:
    job = _worker().job(slide)
    if job is None:
        raise ApiError(404, f"no slide {slide!r}: GET {SLIDES} lists them")
    return job


@bp.get("/slides")
def slides_page():
    state = current_state()
    return render_page("slides.html", max_slide_bytes=state.config.Slides.max_upload_bytes,
                       watch_dir=state.slides.watch_dir)


@bp.get("/slides/<slide>")
def viewer_page(slide: str):
    refused = login_needed()
    if refused is not None:
        return refused
    if _worker().job(slide) is None:
        abort(404)
    return render_page("slides_viewer.html", slide=slide)


@bp.get("/slides/<slide>.dzi")
def dzi(slide: str):
    check_access()
    generator = _worker().deep_zoom(_job(slide))
    return Response(generator.get_dzi("jpeg"), mimetype="application/xml", headers={"Cache-Control": "no-cache"})


@bp.get("/slides/<slide>_files/<int:level>/<int:column>_<int:row>.jpeg")
def dzi_tile(slide: str, level: int, column: int, row: int):
    import openslide

    g.log_level = logging.DEBUG  # a viewer asks for dozens a pan: one log line each would drown the server log
    check_access()
    generator = _worker().deep_zoom(_job(slide))
    try:
        tile = generator.get_tile(level, (column, row))
    except ValueError:
        raise ApiError(404, f"no tile {column}_{row} at level {level} of {slide}") from None
    except openslide.OpenSlideError as err:
        raise ApiError(422, f"{slide}: tile {column}_{row} at level {level} cannot be read: {str(err)[:200]}") from None
    out = io.BytesIO()
    tile.save(out, "JPEG", quality=JPEG_QUALITY)
    # The viewer asks for the image with ?v=<file's mtime>: a changed file has new tile URLs.
    return Response(out.getvalue(), mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


def _counts(jobs: list[dict]) -> str:
    counts = collections.Counter(job["status"] for job in jobs)
    said = ", ".join(f"{counts[s]} {s}" for s in ("running", "queued", "done", "failed") if counts[s])
    return f"{len(jobs)} slides" + (f": {said}" if said else "")


@bp.get(SLIDES)
def list_slides():
    check_access()
    jobs = _worker().jobs()
    return {"Response": "OK", "ResponseMessage": _counts(jobs), "Slides": jobs}


@bp.get(f"{SLIDES}/<slide>")
def one_slide(slide: str):
    check_access()
    worker, job = _worker(), _job(slide)
    body = job.public()
    if job.status == "done":
        folder = worker.root / job.id
        try:
            body["summary"] = json.loads((folder / FILES["summary"]).read_text())
            body["flagged"] = worker.flagged(job)
        except (OSError, ValueError) as err:
            raise ApiError(404, f"{slide}: its results cannot be read ({err}): analyse it again") from None
        body["files"] = {key: f"{SLIDES}/{job.id}/files/{name}" for key, name in FILES.items()}
    body["dzi"] = f"/slides/{job.id}.dzi?v={job.mtime_ns}"
    return {"Response": "OK", "ResponseMessage": f"{job.id}: {job.status}", "Slide": body}


@bp.get(f"{SLIDES}/<slide>/files/<name>")
def slide_file(slide: str, name: str):
    check_access()
    job = _job(slide)
    if name not in FILES.values():
        raise ApiError(404, f"no file {name!r}: a slide's files are {', '.join(FILES.values())}")
    path = _worker().root / job.id / name
    if job.status != "done" or not path.is_file():
        raise ApiError(404, f"{slide} has no {name} ({job.status})")
    download = Path(name).suffix != ".png"  # the images show in the page; the data downloads
    return send_file(path, mimetype=FILE_TYPES.get(Path(name).suffix), as_attachment=download,
                     download_name=f"{job.id}-{name}", max_age=0)


@bp.post(SLIDES)
def upload():
    """The slide as the raw body (`?name=FILE.svs`) or as the multipart field `file`; streamed into a
    folder of its own under .uploads/, validated, queued: 202."""
    check_access(changes=True)
    state = current_state()
    worker = state.slides
    if state.classifier is None:
        raise ApiError(503, NO_MODEL)
    limit = state.config.Slides.max_upload_bytes
    request.max_content_length = limit  # this route's own limit, not Server.max_upload_bytes
    name = request.args.get("name")
    if request.mimetype != "multipart/form-data":
        if not name:
            raise ApiError(400, "send the slide's file name as ?name=FILE.svs with the raw body (its suffix "
                                "says the format), or the slide as multipart field 'file'")
        worker.check_upload(name)  # before reading gigabytes
    folder = worker.uploads / f".part-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True)
        received, name = _receive(folder, name, worker.check_upload, limit)
        answer = worker.accept_upload(received, name)
    except RequestEntityTooLarge:
        raise ApiError(413, f"slide too large: the limit is {limit} bytes (Slides.max_upload_bytes)") from None
    except OSError as err:
        raise ApiError(507, f"cannot store the upload in {worker.uploads}: {err.strerror or err} (is the disk "
                            "full? Slides.output_dir sets where slides go)") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    response = {"Response": "OK", "ResponseMessage": f"{answer['file']}: queued as {answer['id']} "
                                                     f"(position {answer['position']})", "Slide": answer}
    return response, 202, {"Location": f"{SLIDES}/{answer['id']}"}


def _receive(folder: Path, name: str | None, check_upload, limit: int) -> tuple[Path, str]:
    """Write the request's slide into `folder`, chunk by chunk: the raw body, or the multipart field
    `file` (werkzeug's parser writes each file part to a file made here, never to memory). Returns
    the file (named after the slide's id, so OpenSlide's messages name it) and the name it was sent with."""
    if request.mimetype == "multipart/form-data":
        parts: list[Path] = []

        def part_file(total_content_length, content_type, filename=None, content_length=None):
            parts.append(folder / f"part-{len(parts)}")
            return parts[-1].open("w+b")

        parser = FormDataParser(stream_factory=part_file, max_form_memory_size=64 * 1024, max_content_length=limit,
                                max_form_parts=16)
        try:
            _, _, files = parser.parse(request.stream, request.mimetype, request.content_length,
                                       request.mimetype_params)
        except ValueError as err:
            raise ApiError(400, f"malformed multipart body ({err}): send the slide as multipart field 'file'") from None
        for storage in files.values():
            storage.close()
        upload = files.get("file")
        if upload is None or not upload.filename:
            raise ApiError(400, "multipart request without a 'file' field: send the slide as the file field "
                                "'file' (e.g. curl -F file=@slide.svs)")
        name = upload.filename
        path = folder / f"{slide_id(name)[:MAX_ID]}{check_upload(name)}"
        Path(upload.stream.name).replace(path)
        return path, name
    path = folder / f"{slide_id(name)[:MAX_ID]}{check_upload(name)}"
    with path.open("wb") as out:
        while chunk := request.stream.read(CHUNK):
            out.write(chunk)
    return path, name
