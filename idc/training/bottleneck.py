"""The bottleneck cache (as in TensorFlow's classic retrain tool): each image's trunk features
are computed once and stored on disk; later training runs read them back.

Entries are keyed by the SHA-1 of the image bytes inside a folder keyed by the trunk (weights,
feature layer, input size, preprocessing version): a changed image, input size or trunk
misses the cache, and an unchanged one is never recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from idc.core.bundle import PREPROCESSING_VERSION
from idc.core.preprocessing import decode_image
from idc.training import augment

log = logging.getLogger(__name__)


def trunk_key(weights_id: str, feature_layers: list[str], pooling: str, image_size: int,
              view: str = "identity") -> str:
    """A short, stable name for one trunk configuration and view of the images (for a stain view,
    `view` is augment.describe_view's text, strengths and seed included)."""
    text = json.dumps([weights_id, feature_layers, pooling, image_size, view, PREPROCESSING_VERSION])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


class BottleneckCache:
    """Features of images for one trunk, stored as one .npz (digests + feature matrix)."""

    def __init__(self, cache_dir: str | Path, key: str, description: dict | None = None, view: str = "identity",
                 stain_jitter: dict[str, float] | None = None, seed: int = 0):
        self.view, self.stain_jitter, self.seed = view, stain_jitter, seed
        self.folder = Path(cache_dir) / key
        self.path = self.folder / "bottlenecks.npz"
        self.description = description or {}
        self._features: dict[str, np.ndarray] = {}
        if self.path.exists():
            with np.load(self.path) as stored:
                self._features = dict(zip(stored["digests"].tolist(), stored["features"]))
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._features)

    def features(self, paths: list[Path], trunk, batch_size: int, image_size: int) -> np.ndarray:
        """Features for `paths` (N, C): cached ones read back, the others computed and saved."""
        digests = [file_digest(p) for p in paths]
        todo = sorted({d: p for d, p in zip(digests, paths) if d not in self._features}.items())
        self.hits, self.misses = len(paths) - len(todo), len(todo)
        if todo:
            log.info("bottlenecks: %d cached, computing %d", self.hits, self.misses)
            for start in tqdm(range(0, len(todo), batch_size), desc=f"bottlenecks ({self.view})", unit="batch"):
                chunk = todo[start:start + batch_size]
                batch = augment.view_batch([decode_image(path) for _, path in chunk], [d for d, _ in chunk],
                                           self.view, image_size, self.stain_jitter, self.seed)
                values = np.asarray(trunk(batch, training=False), dtype=np.float32)
                self._features.update((digest, value) for (digest, _), value in zip(chunk, values))
            self.save()
        return np.stack([self._features[d] for d in digests])

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        digests = sorted(self._features)
        tmp = self.folder / "bottlenecks.tmp.npz"
        np.savez(tmp, digests=np.array(digests), features=np.stack([self._features[d] for d in digests]))
        tmp.replace(self.path)  # atomic: an interrupted run never leaves a half-written cache
        (self.folder / "trunk.json").write_text(json.dumps(self.description, indent=2))
