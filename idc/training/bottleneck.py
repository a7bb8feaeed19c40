"""The bottleneck cache (as in TensorFlow's classic retrain tool): each image's trunk features
are computed once and stored on disk; later training runs, and every worker of a cluster, read
them back.

Layout: `<cache_dir>/<key>/` holds one trunk configuration and view of the images (the key hashes
the weights, feature layers, pooling, input size, view and preprocessing version; trunk.json says
what it stands for), in up to 256 shard files `shard-<xx>.npy`, xx being the first two hex digits
of each image's SHA-1. A shard is ONE .npy record, {digests: S40[N], features: float32[N, C]}: the
digests and the feature matrix side by side, each contiguous, so that `np.load(mmap_mode="r")`
maps both and listing the digests reads N * 40 bytes, not the features.

- Keyed by content: a changed image (another digest), input size, trunk or view misses the
  cache; an unchanged image is never recomputed.
- Atomic: a shard is written to a temporary file beside it and renamed over the old one, so a
  reader (another worker) sees the old shard or the new one, never half of one; a killed run keeps
  every shard it finished.
- Append-only: a rewrite keeps the old rows where they were and adds new ones after them, so a
  row number found once stays valid however the shard grows meanwhile.
- Shared by a cluster: shard xx belongs to worker int(xx, 16) % workers, which alone computes and
  writes it (shares by content hash: stable, disjoint, about equal). Every worker then waits for
  the others' shards (`wait_for`, bounded) and reads all of them: each image is computed once in
  the whole cluster.
- Streamed: `CachedFeatures` reads batches of rows with positional reads. Nothing holds all the
  features in memory (277,524 patches x 4 views x 1,088 floats are 4.8 GB).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from idc.core.bundle import PREPROCESSING_VERSION
from idc.core.errors import ClusterWaitError
from idc.core.files import replaced_atomically, write_text_atomically
from idc.core.preprocessing import decode_image
from idc.training import augment

log = logging.getLogger(__name__)

SHARD_DIGITS = 2  # 256 shards: ~1,100 patches (4.7 MB) each at the full dataset's size, per view
DIGEST_LENGTH = 40  # hex SHA-1
LEGACY_FILE = "bottlenecks.npz"  # the format before shards (everything in one file): converted on first use
# A worker waiting for the others' shares gives up when none of the missing entries has arrived for this long.
DEFAULT_STALL_SECONDS = 1800.0


def trunk_key(weights_id: str, feature_layers: list[str], pooling: str, image_size: int,
              view: str = "identity") -> str:
    """A short, stable name for one trunk configuration and view of the images (for a stain view,
    `view` is augment.describe_view's text, strengths and seed included)."""
    text = json.dumps([weights_id, feature_layers, pooling, image_size, view, PREPROCESSING_VERSION])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def shard_of(digest: str) -> str:
    return digest[:SHARD_DIGITS]


def shard_owner(shard: str, workers: int) -> int:
    """The worker (0..workers-1) that computes and writes `shard`."""
    return int(shard, 16) % workers


def read_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(digests S40[N], features float32[N, C]) of one shard, both memory-mapped (nothing is read yet).

    Not np.load(mmap_mode="r"): it opens the file twice (the header, then the data), and a shard
    replaced in between would be read with the old one's header."""
    with open(path, "rb") as f:
        dtype, offset = _record_layout(f)
        record = np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=())
    return record["digests"], record["features"]


def _record_layout(f) -> tuple[np.dtype, int]:
    """The dtype of a shard file's record and where its data starts, from its .npy header."""
    f.seek(0)
    version = np.lib.format.read_magic(f)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"{getattr(f, 'name', 'a shard')} is a .npy file of format {version}, not a cache shard")
    shape, _, dtype = readers[version](f)
    if shape != () or dtype.names != ("digests", "features"):
        raise ValueError(f"{getattr(f, 'name', 'a shard')} is not a bottleneck cache shard")
    return dtype, f.tell()


def write_shard(path: Path, digests: np.ndarray, features: np.ndarray) -> None:
    """Write one shard atomically: a temporary file in the same folder, flushed, renamed over `path`."""
    n, dim = features.shape
    record = np.zeros((), dtype=[("digests", f"S{DIGEST_LENGTH}", (n,)), ("features", "<f4", (n, dim))])
    record["digests"], record["features"] = digests, features
    with replaced_atomically(path, fsync=True) as tmp, open(tmp, "wb") as f:
        np.save(f, record)


class BottleneckCache:
    """Features of images for one trunk and view, in shards (see the module's docstring).

    `worker`/`workers`: this process's place in a cluster; it computes only its own share."""

    def __init__(self, cache_dir: str | Path, key: str, description: dict | None = None, view: str = "identity",
                 stain_jitter: dict[str, float] | None = None, seed: int = 0, worker: int = 0, workers: int = 1):
        self.view, self.stain_jitter, self.seed = view, stain_jitter, seed
        self.worker, self.workers = worker, workers
        self.folder = Path(cache_dir) / key
        self.description = description or {}
        self.hits = self.misses = self.from_other_workers = 0
        if workers == 1 and (self.folder / LEGACY_FILE).exists():
            self._convert_legacy()

    def shard_path(self, shard: str) -> Path:
        return self.folder / f"shard-{shard}.npy"

    def shard_digests(self, shard: str) -> np.ndarray:
        """The digests (S40) stored in one shard, as they are on disk now."""
        path = self.shard_path(shard)
        return np.array(read_shard(path)[0]) if path.exists() else np.zeros(0, f"S{DIGEST_LENGTH}")

    def __len__(self) -> int:
        return sum(len(read_shard(path)[0]) for path in self.folder.glob("shard-*.npy"))

    def compute(self, paths: list[Path], trunk, batch_size: int, image_size: int,
                digests: list[str] | None = None) -> list[str]:
        """Compute and store this worker's share of the features of `paths` that are not cached yet;
        returns the images' digests. Sets `hits` (cached already), `misses` (computed here) and
        `from_other_workers` (missing, but another worker's share: see `wait_for`)."""
        digests = digests if digests is not None else [file_digest(p) for p in paths]
        first_path = dict(zip(reversed(digests), reversed(paths)))  # one image per content
        by_shard = defaultdict(list)
        for digest in first_path:
            by_shard[shard_of(digest)].append(digest)
        missing = []
        for shard, wanted in by_shard.items():
            stored = set(self.shard_digests(shard).astype(str))
            missing += [d for d in wanted if d not in stored]
        missing.sort()
        mine = [d for d in missing if shard_owner(shard_of(d), self.workers) == self.worker]
        self.hits, self.misses, self.from_other_workers = len(paths) - len(missing), len(mine), len(missing) - len(mine)
        if not mine:
            return digests
        log.info("bottlenecks (%s): %d cached, computing %d%s", self.view, self.hits, len(mine),
                 f", {self.from_other_workers} left to the other workers" if self.workers > 1 else "")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_description()
        pending: dict[str, list[tuple[str, np.ndarray]]] = defaultdict(list)
        for start in tqdm(range(0, len(mine), batch_size), desc=f"bottlenecks ({self.view})", unit="batch"):
            chunk = mine[start:start + batch_size]
            batch = augment.view_batch([decode_image(first_path[d]) for d in chunk], chunk, self.view, image_size,
                                       self.stain_jitter, self.seed)
            values = np.asarray(trunk(batch, training=False), dtype=np.float32)
            for digest, value in zip(chunk, values):
                pending[shard_of(digest)].append((digest, value))
            # `mine` is sorted: every shard before the next image's is complete, so it is written now
            # (once), and a killed run loses at most the shards in progress.
            upcoming = shard_of(mine[start + batch_size]) if start + batch_size < len(mine) else None
            for shard in [s for s in pending if upcoming is None or s < upcoming]:
                self._append(shard, pending.pop(shard))
        return digests

    def wait_for(self, digests: list[str], stall_seconds: float = DEFAULT_STALL_SECONDS) -> None:
        """Return once every digest is in the cache (the other workers' shares included); raise
        ClusterWaitError when none of the missing ones has arrived for `stall_seconds`."""
        needed: dict[str, set[str]] = defaultdict(set)
        for digest in set(digests):
            needed[shard_of(digest)].add(digest)
        started = last_progress = time.monotonic()
        remaining, pause = None, 0.2
        while True:
            for shard in list(needed):
                needed[shard] -= set(self.shard_digests(shard).astype(str))
                if not needed[shard]:
                    del needed[shard]
            count = sum(len(v) for v in needed.values())
            if not count:
                return
            now = time.monotonic()
            if remaining is None or count < remaining:
                remaining, last_progress = count, now
            elif now - last_progress >= stall_seconds or self.workers == 1:
                owners = sorted({shard_owner(s, self.workers) for s in needed})
                raise ClusterWaitError(
                    f"{count} bottlenecks of view {self.view!r} are missing from {self.folder} after "
                    f"{now - started:.0f} s, none arriving for {now - last_progress:.0f} s: they are the share of "
                    f"worker(s) {', '.join(map(str, owners))} of {self.workers} (shards {', '.join(sorted(needed)[:8])}"
                    f"{' ...' if len(needed) > 8 else ''}). Is every worker running, with the same data, settings "
                    "and model directory (on a file system all of them share)?")
            time.sleep(pause)
            pause = min(pause * 1.5, 5.0)

    def lookup(self, digests: list[str]) -> CachedFeatures:
        """The cached features of `digests` (in that order), to be read in batches; every one must
        be in the cache (after `compute` and `wait_for`)."""
        wanted = np.array(digests, dtype=f"S{DIGEST_LENGTH}")
        shards, shard_index = np.unique([shard_of(d) for d in digests], return_inverse=True)
        rows = np.zeros(len(digests), np.int64)
        dim = 0
        for i, shard in enumerate(shards):
            members = np.flatnonzero(shard_index == i)
            path = self.shard_path(shard)
            stored, features = read_shard(path) if path.exists() else (np.zeros(0, f"S{DIGEST_LENGTH}"), None)
            stored = np.asarray(stored)
            order = np.argsort(stored)  # shards are append-only, not sorted
            found = order[np.searchsorted(stored, wanted[members], sorter=order).clip(0, len(stored) - 1)] \
                if len(stored) else np.zeros(len(members), np.int64)
            absent = np.ones(len(members), bool) if not len(stored) else stored[found] != wanted[members]
            if absent.any():
                raise ClusterWaitError(f"{int(absent.sum())} bottlenecks of view {self.view!r} are not in {self.folder} "
                                       f"(e.g. {wanted[members][absent][0].decode()}): compute them first")
            rows[members] = found
            dim = features.shape[1]
        return CachedFeatures([self.shard_path(s) for s in shards], shard_index.astype(np.int32), rows, dim)

    def features(self, paths: list[Path], trunk, batch_size: int, image_size: int) -> np.ndarray:
        """Features for `paths` (N, C), all in memory: cached ones read back, the others computed and
        saved. For small sets; training streams them (compute, wait_for, lookup)."""
        digests = self.compute(paths, trunk, batch_size, image_size)
        self.wait_for(digests)
        return self.lookup(digests).read(np.arange(len(digests)))

    def _append(self, shard: str, entries: list[tuple[str, np.ndarray]]) -> None:
        """Add entries to a shard (old rows first, where they were), rewritten atomically."""
        path = self.shard_path(shard)
        with open(self.folder / f".shard-{shard}.lock", "a") as lock:
            # A cluster's workers never write the same shard, but two jobs sharing a cache could: the second
            # waits, then adds to what the first wrote (neither loses the other's rows).
            fcntl.flock(lock, fcntl.LOCK_EX)
            old_digests, old_features = read_shard(path) if path.exists() else (None, None)
            known = set(np.asarray(old_digests).astype(str)) if old_digests is not None else set()
            new = list({d: v for d, v in entries if d not in known}.items())
            if not new:
                return
            digests = np.array([d for d, _ in new], dtype=f"S{DIGEST_LENGTH}")
            features = np.stack([v for _, v in new]).astype(np.float32)
            if old_digests is not None:
                digests = np.concatenate([old_digests, digests])
                features = np.concatenate([old_features, features])
            write_shard(path, digests, features)

    def _write_description(self) -> None:
        write_text_atomically(self.folder / "trunk.json", json.dumps(self.description, indent=2))

    def _convert_legacy(self) -> None:
        """A cache of the one-file format (bottlenecks.npz) becomes shards: nothing is recomputed."""
        legacy = self.folder / LEGACY_FILE
        with np.load(legacy) as stored:
            digests, features = stored["digests"].astype(str), stored["features"]
        groups = defaultdict(list)
        for digest, value in zip(digests, features):
            groups[shard_of(digest)].append((digest, value))
        for shard, entries in groups.items():
            self._append(shard, entries)
        legacy.unlink()
        log.info("bottlenecks (%s): converted %d entries of %s to shards", self.view, len(digests), legacy)


class CachedFeatures:
    """Rows of cached features (e.g. every training patch in every view), read in batches.

    Holds only where each row is (which shard file, which row in it). Rows are read with positional
    reads, not through the memory map: the pages of a memory map count in the process's resident
    memory until unmapped (and the kernel maps neighbouring pages on each fault), so random batches
    over a 4.8 GB cache would have grown it to the cache's size; read this way the files stay in the
    page cache, which the kernel can always reclaim."""

    def __init__(self, files: list[Path], shard: np.ndarray, row: np.ndarray, dim: int):
        self.files, self.shard, self.row, self.dim = list(files), shard, row, dim
        self._layout: dict[int, tuple[int, int, int]] = {}  # file -> (inode, size, offset of the features)

    def __len__(self) -> int:
        return len(self.row)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.row), self.dim

    @classmethod
    def concat(cls, parts: list[CachedFeatures]) -> CachedFeatures:
        """The rows of `parts`, one after the other (e.g. the views of the training patches)."""
        dims = {p.dim for p in parts if len(p)}
        if len(dims) > 1:
            raise ValueError(f"cannot concatenate features of widths {sorted(dims)}")
        offsets = np.cumsum([0] + [len(p.files) for p in parts])
        return cls([f for p in parts for f in p.files],
                   np.concatenate([p.shard + o for p, o in zip(parts, offsets)]).astype(np.int32),
                   np.concatenate([p.row for p in parts]), dims.pop() if dims else 0)

    def read(self, indices) -> np.ndarray:
        """The features of rows `indices` (any order, repeats allowed), as a float32 (n, C) array."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.dim), np.float32)
        shards = self.shard[indices]
        order = np.argsort(shards, kind="stable")
        starts = np.flatnonzero(np.diff(shards[order])) + 1
        row_bytes = self.dim * 4
        for group in np.split(order, starts):
            if not len(group):
                continue
            file = int(shards[group[0]])
            fd = os.open(self.files[file], os.O_RDONLY)
            try:
                offset = self._features_offset(file, fd)
                for i in group:
                    if os.preadv(fd, [out[i]], offset + int(self.row[indices[i]]) * row_bytes) != row_bytes:
                        raise OSError(f"{self.files[file]} is shorter than its header says")
            finally:
                os.close(fd)
        return out

    def chunks(self, size: int = 8192) -> Iterator[np.ndarray]:
        """All rows in order, `size` at a time (e.g. to adapt the standardisation, streamed)."""
        for start in range(0, len(self), size):
            yield self.read(np.arange(start, min(start + size, len(self))))

    def _features_offset(self, file: int, fd: int) -> int:
        """Where the feature matrix starts in the file open as `fd`: the header says, and it is read
        again only when the file was replaced (a shard grew: its old rows are where they were)."""
        stat = os.fstat(fd)
        known = self._layout.get(file)
        if known and known[:2] == (stat.st_ino, stat.st_size):
            return known[2]
        with os.fdopen(os.dup(fd), "rb") as f:  # a duplicate: closing it leaves `fd` open
            dtype, start = _record_layout(f)
        offset = start + dtype.fields["features"][1]
        self._layout[file] = (stat.st_ino, stat.st_size, offset)
        return offset
