"""Where things are, for the tests (a support module: import from here, never from conftest): the
checkout's root and the real data and weights in ../shared beside it."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data" / "idc-patches"
SHARED_PATIENTS = SHARED / "data" / "idc-patches-patients.csv"
SHARED_WEIGHTS = SHARED / "weights" / "inception_v3_notop.weights.h5"


def require_shared(path: Path) -> Path:
    """Skip (with the reason) when a file from ../shared is absent, e.g. on a fresh clone elsewhere."""
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the shared real data/weights beside the project")
    return path
