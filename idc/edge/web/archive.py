"""The optional archive of accepted uploads (Server.archive_dir), capped at Server.archive_max_bytes."""

from __future__ import annotations

import collections
import datetime
import logging
import re
import threading
import uuid
from pathlib import Path

from idc.core.files import IMAGE_FORMATS

log = logging.getLogger(__name__)


class UploadArchive:
    """A folder of accepted uploads, at most `max_bytes` in total: the oldest are deleted first.

    File names are made here (UTC time, random id, result), never taken from the client; only
    files named that way are counted or deleted, so nothing else in the folder is touched.
    """

    NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}Z_[0-9a-f]{12}_idc[01]_p\d\.\d{4}(_review)?\."
                      rf"({'|'.join(spec.extension for spec in IMAGE_FORMATS.values())})$")

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Names start with the time, so name order is age order.
        existing = sorted(p for p in self.folder.iterdir() if p.is_file() and self.NAME.match(p.name))
        self._files = collections.deque((p, p.stat().st_size) for p in existing)
        self._total = sum(size for _, size in self._files)
        with self._lock:
            self._trim()

    @property
    def total_bytes(self) -> int:
        return self._total

    def add(self, data: bytes, image_format: str, label: int, p_idc: float, needs_review: bool) -> Path | None:
        """Store one upload; never raises (a full disk must not fail the request)."""
        if len(data) > self.max_bytes:
            log.warning("archive: a %d-byte upload is larger than archive_max_bytes; not archived", len(data))
            return None
        now = datetime.datetime.now(datetime.timezone.utc)
        name = (f"{now:%Y%m%dT%H%M%S.%f}Z_{uuid.uuid4().hex[:12]}_idc{label}_p{p_idc:.4f}"
                f"{'_review' if needs_review else ''}.{IMAGE_FORMATS[image_format].extension}")
        path = self.folder / name
        try:
            with self._lock:
                with path.open("xb") as f:
                    f.write(data)
                self._files.append((path, len(data)))
                self._total += len(data)
                self._trim()
            return path
        except OSError as err:
            log.error("archive: cannot write %s: %s", path, err)
            return None

    def _trim(self) -> None:
        while self._total > self.max_bytes and self._files:
            oldest, size = self._files.popleft()
            self._total -= size
            oldest.unlink(missing_ok=True)
