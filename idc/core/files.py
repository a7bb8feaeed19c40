"""Files: finding the images a script is given, and replacing a file atomically (no NumPy or Pillow:
the client imports this too)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple


class ImageFormat(NamedTuple):
    extension: str  # the one written for it (archive, training split)
    mime: str
    suffixes: tuple[str, ...]  # file name suffixes read as this format


# THE accepted image formats (Pillow's names): decoding refuses any other, and the server, the
# client, the archive and the review station read extensions and MIME types from here.
IMAGE_FORMATS = {
    "PNG": ImageFormat("png", "image/png", (".png",)),
    "JPEG": ImageFormat("jpg", "image/jpeg", (".jpg", ".jpeg")),
    "BMP": ImageFormat("bmp", "image/bmp", (".bmp",)),
    "TIFF": ImageFormat("tif", "image/tiff", (".tif", ".tiff")),
}
FORMAT_NAMES = "PNG, JPEG, BMP or TIFF"
IMAGE_SUFFIXES = {suffix: name for name, spec in IMAGE_FORMATS.items() for suffix in spec.suffixes}


def find_images(paths: list[str | Path]) -> list[Path]:
    """The given files, and every image under the given folders (sorted)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)
    return found


def mime_type(path: str | Path) -> str:
    """The MIME type of an image file, from its suffix (application/octet-stream if not an image's)."""
    name = IMAGE_SUFFIXES.get(Path(path).suffix.lower())
    return IMAGE_FORMATS[name].mime if name else "application/octet-stream"


@contextmanager
def replaced_atomically(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed over `path` when the block ends, so that a reader
    (another worker of a cluster) sees the old file or the new one, never half of one, and a killed writer
    leaves the old one. Removed instead if the block raises. `fsync`: the data is on disk before the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | Path, text: str) -> None:
    """`path.write_text(text)`, atomically (see replaced_atomically)."""
    with replaced_atomically(path) as tmp:
        tmp.write_text(text)
