"""The model bundle: one home for a trained model and everything needed to use it.

`ModelDir` owns the model directory's layout (sorted splits and their manifest, the Keras model,
classes.txt, model.json, the IRs, reports, logs, caches); nothing else spells those paths.
`Bundle` is `model.json`, written by `trainer.py train` beside the Keras model and copied (with
the precision added) beside each OpenVINO IR: the input size, feature layers, pooling, views,
classes, decision rule, preprocessing version, weights, a fingerprint of the training data, when
and by which version it was made. Evaluation, compile, inception_test.py, the server and the
benchmarks read the model's settings from here, never from confs.json, so editing confs.json after
training cannot change what is evaluated, compiled or served. Only the threshold and review band
may be overridden on purpose (`ClassifierSettings.threshold_override`, `review_band_override`,
or a --threshold / --review-band flag); `Bundle.with_decision_rule` says which values apply.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
import time
from pathlib import Path

from idc import __version__
from idc.core.errors import DatasetError, ModelNotFoundError

BUNDLE_FILE = "model.json"
BUNDLE_FORMAT = 1
# Bump when preprocessing changes the pixels fed to the model (also keys the bottleneck cache).
PREPROCESSING_VERSION = 1
PREPROCESSING = "RGB; pad to a square with white; bilinear resize; x / 127.5 - 1"
CLASS_NAMES = {0: "no IDC", 1: "IDC"}
PRECISIONS = ("FP32", "FP16", "INT8")

SPLITS = ("train", "validation", "test")
PATCH_NAME = re.compile(r"^(?P<patient>[^_/]+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<label>[01])\.png$")
MANIFEST_FIELDS = ("split", "file", "source", "patient", "x", "y", "label")


@dataclasses.dataclass(frozen=True)
class Patch:
    path: Path
    patient: str
    x: int
    y: int
    label: int  # 0 = no IDC, 1 = IDC


def parse_patch_name(path: Path) -> Patch | None:
    """A Patch from a Kaggle IDC file name, or None when the name is not one."""
    match = PATCH_NAME.match(path.name)
    if not match:
        return None
    return Patch(path, match["patient"], int(match["x"]), int(match["y"]), int(match["label"]))


class ModelDir:
    """The model directory's layout: every artefact's path, in one place."""

    def __init__(self, root: str | Path, name: str):
        self.root, self.name = Path(root), name

    @property
    def keras_model(self) -> Path:
        return self.root / f"{self.name}.keras"

    @property
    def bundle_file(self) -> Path:
        return self.root / BUNDLE_FILE

    @property
    def classes_file(self) -> Path:
        return self.root / "classes.txt"

    @property
    def training_record(self) -> Path:
        return self.root / "training.json"

    @property
    def trainer_options(self) -> Path:
        """The options `trainer.py` was last given (--data, --weights, ...), reused by the next run."""
        return self.root / "trainer_options.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def skipped(self) -> Path:
        return self.root / "skipped.csv"

    def split_dir(self, split: str) -> Path:
        return self.root / split

    def example(self, label: int) -> Path:
        """test/positive.png (label 1) or test/negative.png (label 0): patches of test patients."""
        return self.root / "test" / ("positive.png" if label else "negative.png")

    def ir_dir(self, precision: str) -> Path:
        return self.root / "ir" / precision

    def ir_xml(self, precision: str) -> Path:
        return self.ir_dir(precision) / f"{self.name}.xml"

    @property
    def parity_report(self) -> Path:
        return self.root / "ir" / "parity.json"

    def report_dir(self, name: str) -> Path:
        return self.root / "reports" / name

    def log_dir(self, name: str) -> Path:
        return self.root / "logs" / name

    def history(self, phase: str) -> Path:
        return self.root / f"history_{phase}.csv"

    def checkpoint(self, phase: str) -> Path:
        return self.root / "checkpoints" / f"{phase}.keras"

    def backup(self, phase: str) -> Path:
        """The training state of a phase in progress (weights, optimizer, epoch), so that a killed job resumes
        from its last finished epoch; written by the chief, read by every worker, deleted when the phase ends."""
        return self.root / "backups" / phase

    @property
    def bottlenecks(self) -> Path:
        return self.root / "bottlenecks"

    @property
    def slides(self) -> Path:
        """Whole slides' outputs, one folder each (idc.slides.outputs), unless Slides.output_dir is set."""
        return self.root / "slides"

    @property
    def review_db(self) -> Path:
        """The review station's queue (SQLite), unless Server.review_db puts it elsewhere."""
        return self.root / "review.sqlite3"

    def read_manifest(self, split: str | None = None) -> list[Patch]:
        """The sorted patches (of one split, or all), as Patches pointing at the sorted copies."""
        if not self.manifest.exists():
            raise DatasetError(f"{self.manifest} does not exist: run `python trainer.py sort` first")
        with self.manifest.open(newline="") as f:
            return [Patch(self.root / row["file"], row["patient"], int(row["x"]), int(row["y"]), int(row["label"]))
                    for row in csv.DictReader(f) if split is None or row["split"] == split]

    def fingerprint(self, splits: tuple[str, ...] = ("train", "validation")) -> str:
        """SHA-1 of what the model was trained on: each patch's split, patient, name and label."""
        rows = sorted((split, p.patient, p.path.name, p.label) for split in splits for p in self.read_manifest(split))
        return hashlib.sha1(json.dumps(rows).encode()).hexdigest()


def served_files(model_file: str | Path) -> list[Path]:
    """The files a served model is made of: an IR's .xml and .bin, or a Keras file, with the model.json
    beside it (what the edge server hashes as the model's identity)."""
    model_file = Path(model_file)
    weights = [model_file.with_suffix(".bin")] if model_file.suffix == ".xml" else []
    return [model_file, *weights, model_file.parent / BUNDLE_FILE]


@dataclasses.dataclass(frozen=True)
class Bundle:
    """model.json: what a trained model needs to be used exactly as it was trained."""

    model_name: str
    image_size: int
    feature_layers: list[str]
    pooling: str
    train_views: list[str]
    test_time_augmentation: bool
    classes: dict[str, str]
    threshold: float
    review_band: float
    preprocessing_version: int
    preprocessing: str
    weights: str
    data_fingerprint: str
    created_at: str
    project_version: str
    format: int = BUNDLE_FORMAT
    threshold_source: str = "confs.json"  # how training chose the threshold
    # {radius, weight, threshold}, or {kind: "learned", coefficients, threshold}: see idc.core.context; None: patch-alone
    slide_context: dict | None = None
    patch_cnn: bool = False  # the answer mixes the transfer head's and a patch CNN's (model.build_patch_cnn)
    patch_cnn_weight: float | None = None  # the patch CNN's share of it (bundles made before the weight: 0.5)
    # {method, target_mean, target_std}: "reinhard": the model's first layer normalises each image's stain
    # (keras_model.ReinhardNormalization); "slide": a slide's patches, classified together, are normalised
    # with the slide's statistics before the model (idc.slides.stain); None: neither
    stain_normalization: dict | None = None
    precision: str | None = None  # set in an IR's copy: FP32, FP16 or INT8; None for the Keras model
    compiled_with: str | None = None  # the OpenVINO version that compiled an IR
    # The scale of the training patches: whole slides are tiled at it (idc.slides). Older bundles: the dataset's.
    microns_per_pixel: float = 4.0
    patch_pixels: int = 50

    @classmethod
    def new(cls, **fields) -> Bundle:
        return cls(preprocessing_version=PREPROCESSING_VERSION, preprocessing=PREPROCESSING,
                   classes={str(k): v for k, v in CLASS_NAMES.items()},
                   created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), project_version=__version__, **fields)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / BUNDLE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Bundle:
        """The bundle in `folder` (a model directory or an IR folder), or a clear error."""
        path = Path(folder) / BUNDLE_FILE
        if not path.exists():
            raise ModelNotFoundError(
                f"no trained model in {path.parent} (no {BUNDLE_FILE}): run `python trainer.py train` (and "
                "`./compile_ncs.sh` for the IR); a model made before model bundles existed needs retraining too")
        try:
            raw = json.loads(path.read_text())
            names = {f.name for f in dataclasses.fields(cls)}
            missing = sorted(f.name for f in dataclasses.fields(cls)
                             if f.default is dataclasses.MISSING and f.name not in raw)
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            bundle = cls(**{k: v for k, v in raw.items() if k in names})
        except (ValueError, TypeError) as err:
            raise ModelNotFoundError(f"{path} is not a valid model bundle ({err}): retrain with "
                                     "`python trainer.py train`") from None
        if bundle.preprocessing_version != PREPROCESSING_VERSION:
            raise ModelNotFoundError(
                f"{path} was trained with preprocessing version {bundle.preprocessing_version}, this version "
                f"applies {PREPROCESSING_VERSION}: retrain with `python trainer.py train`")
        return bundle

    def with_decision_rule(self, threshold: float | None = None, review_band: float | None = None) -> Bundle:
        """The bundle with the threshold and/or review band overridden (None keeps the trained value)."""
        changes = {k: float(v) for k, v in (("threshold", threshold), ("review_band", review_band)) if v is not None}
        return dataclasses.replace(self, **changes)

    @property
    def external_trunk(self) -> bool:
        """Whether the trunk is a TF Hub handle or SavedModel that the Keras model loads from outside."""
        return self.weights.startswith("source:") and self.weights != "source:imagenet"

    def for_ir(self, precision: str, openvino_version: str) -> Bundle:
        return dataclasses.replace(self, precision=precision, compiled_with=openvino_version)
