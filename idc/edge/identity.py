"""The served model's identity, from its bundle and files: name, precision, content hash.

Every reply of the edge server carries it as headers (`X-IDC-Model`, `X-IDC-Model-Precision`,
`X-IDC-Model-Hash`); /api/health and /api/infer/batch carry it in their JSON too. The content hash
is the SHA-256 of the model files served (the IR's .xml and .bin, or the Keras file) with the
model.json beside them, so two models of the same name trained on other data never look alike.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from idc.core.bundle import served_files


def _files(classifier) -> list[Path]:
    model_file = getattr(classifier, "xml", None) or getattr(classifier, "path", None)
    return served_files(model_file) if model_file is not None else []


def content_hash(files: list[Path]) -> str:
    """SHA-256 over the files' names and bytes (in order); "" when none exists."""
    digest, seen = hashlib.sha256(), False
    for path in files:
        if path.is_file():
            seen = True
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest() if seen else ""


def model_identity(classifier) -> dict:
    """{"name", "precision", "hash" (16 hex digits), "trained_at"}; {} when no model is loaded (or a
    stand-in without a bundle). Reads the model files: computed once per app (ApiState.identity)."""
    if getattr(classifier, "bundle", None) is None:
        return {}
    bundle = classifier.bundle
    return {"name": bundle.model_name,
            "precision": getattr(classifier, "precision", None) or bundle.precision or "keras",
            "hash": content_hash(_files(classifier))[:16] or bundle.data_fingerprint[:16],
            "trained_at": bundle.created_at}


def identity_label(identity: dict) -> str:
    """One line for the review queue: name, precision, hash."""
    return " ".join(str(v) for k, v in identity.items() if k != "trained_at")


def identity_headers(identity: dict) -> dict:
    if not identity:
        return {}
    return {"X-IDC-Model": identity["name"], "X-IDC-Model-Precision": identity["precision"],
            "X-IDC-Model-Hash": identity["hash"]}
