"""confs.json: one config for every script, validated once on load.

Each section is a typed dataclass, and every key has a default: the value in the shipped
confs.json (which still lists every key). A confs.json from an older version loads: the keys it
lacks, or whole sections, take the defaults (logged at debug level). Loading checks every key it
finds (unknown, of the wrong type or a bad value) and names the key, the section and the file in
the error, so a typo never surfaces later as a confusing failure deep inside training or serving.
Relative paths are resolved against the project root (the folder holding confs.json).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import re
import types
import typing
from pathlib import Path

from idc.core.bundle import ModelDir
from idc.core.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = PROJECT_ROOT / "confs.json"
log = logging.getLogger(__name__)


def _fresh(value):
    """The default of a list or dict key: each settings object gets a copy of its own."""
    return dataclasses.field(default_factory=lambda: copy.deepcopy(value))


@dataclasses.dataclass(frozen=True)
class ClassifierSettings:
    dataset_dir: str = "data/IDC_regular_ps50_idx5"
    model_dir: str = "model"
    model_name: str = "DevCloudIDC"
    classes: list[str] = _fresh(["0", "1"])
    patients_file: str | None = None
    patients_file_splits: dict[str, str] = _fresh({"train": "train", "extra": "train", "val": "test"})
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    samples_per_class: int | str = "all"
    random_seed: int = 42
    weights: str = "imagenet"
    feature_layers: list[str] = _fresh(["mixed0", "mixed1"])
    pooling: str = "mean+std"
    train_views: list[str] = _fresh(["identity", "hflip", "vflip", "rot90", "jpeg1"])
    stain_jitter: dict[str, float] = _fresh({"hed": 0.1, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2})
    stain_normalization: str = "none"
    test_time_augmentation: bool = True
    image_size: int = 150
    batch_size: int = 64
    head_batch_size: int = 256
    epochs: int = 150
    learning_rate: float = 0.0001
    l2_regularization: float = 0.0005
    scan_invariance: float = 0.0
    head_hidden_units: int = 256
    early_stopping_patience: int = 15
    class_weighting: bool = True
    fine_tune_blocks: int = 0
    fine_tune_epochs: int = 5
    fine_tune_learning_rate: float = 0.0001
    patch_cnn_epochs: int = 16
    patch_cnn_learning_rate: float = 0.001
    # px of the patch: the phases that train on decoded patches (the patch CNN, fine-tuning) move each
    # patch by up to this much, the edge filled by reflection.
    random_shift: int = 0
    # The patch CNN's share of the model's answer (the head has the rest), chosen on patient folds.
    patch_cnn_weight: float = 0.25
    InceptionThreshold: float = 0.54
    review_band: float = 0.1
    threshold_override: float | None = None
    review_band_override: float | None = None
    decision_rule_from_validation: bool = True
    review_share: float = 0.1
    slide_context_rule: str = "weighted"
    # The scale of the training patches (the IDC dataset: about 4 um per pixel, 200 um a 50 px patch),
    # recorded in the model bundle: whole slides are read at it (idc.slides).
    microns_per_pixel: float = 4.0

    def check(self) -> None:
        _require(self.microns_per_pixel > 0, "microns_per_pixel", "must be positive (um per pixel of the patches)")
        _require(0.0 < self.InceptionThreshold < 1.0, "InceptionThreshold", "must be between 0 and 1")
        _require(0.0 <= self.review_band < 0.5, "review_band", "must be in [0, 0.5)")
        _require(self.threshold_override is None or 0.0 < self.threshold_override < 1.0, "threshold_override",
                 "must be null or between 0 and 1")
        _require(0.0 <= self.review_share < 1.0, "review_share", "must be a fraction in [0, 1)")
        _require(self.slide_context_rule in ("weighted", "learned"), "slide_context_rule", 'must be "weighted" or "learned"')
        _require(self.review_band_override is None or 0.0 <= self.review_band_override < 0.5,
                 "review_band_override", "must be null or in [0, 0.5)")
        _require(75 <= self.image_size <= 1024, "image_size", "Inception V3 needs 75..1024 px")
        _require(self.batch_size > 0, "batch_size", "must be positive")
        _require(self.head_batch_size > 0, "head_batch_size", "must be positive")
        _require(self.l2_regularization >= 0, "l2_regularization", "must not be negative")
        _require(self.scan_invariance >= 0, "scan_invariance", "must not be negative (0: off)")
        _require(isinstance(self.head_hidden_units, int) and self.head_hidden_units >= 0, "head_hidden_units",
                 "must be 0 (a linear head) or a positive number of units")
        _require(not (self.head_hidden_units and self.scan_invariance), "head_hidden_units/scan_invariance",
                 "scan_invariance needs a linear head (head_hidden_units 0): its penalty is that layer's closed form")
        _require(self.epochs > 0, "epochs", "must be positive")
        _require(self.patch_cnn_epochs >= 0, "patch_cnn_epochs", "must be 0 (no patch CNN) or more")
        _require(self.patch_cnn_learning_rate > 0, "patch_cnn_learning_rate", "must be positive")
        _require(0 <= self.random_shift < 25, "random_shift",
                 "must be a number of pixels in [0, 25): under half the patch")
        _require(0.0 < self.patch_cnn_weight <= 1.0, "patch_cnn_weight",
                 "must be in (0, 1]: the patch CNN's share of the answer (patch_cnn_epochs 0 for none)")
        _require(
            0 <= self.validation_fraction < 1 and 0 <= self.test_fraction < 1
            and self.validation_fraction + self.test_fraction < 1,
            "validation_fraction/test_fraction", "must be fractions that sum to less than 1",
        )
        _require(
            self.samples_per_class == "all"
            or (isinstance(self.samples_per_class, int) and self.samples_per_class > 0),
            "samples_per_class", 'must be a positive integer or "all"',
        )
        _require(self.classes == ["0", "1"], "classes", 'must be ["0", "1"] (0 = no IDC, 1 = IDC)')
        _require(len(self.feature_layers) > 0, "feature_layers", "must name at least one layer")
        _require(self.pooling in ("mean", "mean+std"), "pooling", 'must be "mean" or "mean+std"')
        views = ("identity", "hflip", "vflip", "rot90")
        drawn = [v for v in self.train_views if re.fullmatch(r"(stain|jpeg|blur)[1-9][0-9]*", v)]
        _require(len(self.train_views) > 0 and set(self.train_views) <= set(views) | set(drawn), "train_views",
                 f"must be a non-empty list of {list(views)}, stain views stain1, stain2, ..., JPEG views "
                 "jpeg1, jpeg2, ... and blur views blur1, blur2, ...")
        _require(sorted(self.stain_jitter) == sorted(("hed", "brightness", "contrast", "saturation"))
                 and all(0 <= v < 1 for v in self.stain_jitter.values()), "stain_jitter",
                 'must give "hed", "brightness", "contrast" and "saturation", each a fraction in [0, 1)')
        _require(self.stain_normalization in ("none", "reinhard", "slide"), "stain_normalization",
                 'must be "none", "reinhard" or "slide"')
        bad = set(self.patients_file_splits.values()) - {"train", "validation", "test"}
        _require(not bad, "patients_file_splits", f"maps to unknown splits {sorted(bad)}")

    @property
    def tta_views(self) -> tuple[str, ...]:
        """The views test-time augmentation averages over: the flips/rotations trained on."""
        return tuple(v for v in self.train_views if not v.startswith(("stain", "jpeg", "blur")))


@dataclasses.dataclass(frozen=True)
class OpenVINOSettings:
    device: str = "CPU"
    # "auto": compile FP16 (and INT8 on a CPU) and serve INT8 on a CPU when it passed the parity
    # gate, else FP16 (idc.edge.engine.served_precision)
    precision: str = "auto"
    calibration_samples: int = 300

    def check(self) -> None:
        _require(self.precision in ("auto", "FP32", "FP16", "INT8"), "precision", "must be auto, FP32, FP16 or INT8")
        _require(self.calibration_samples > 0, "calibration_samples", "must be positive")


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 7455
    threads: int = 4
    api_key: str | None = None
    max_upload_bytes: int = 5_000_000
    max_image_side: int = 4096
    archive_dir: str | None = None
    archive_max_bytes: int = 100_000_000
    tls_cert: str | None = None
    tls_key: str | None = None
    connection_limit: int = 500
    idle_timeout: int = 10
    review_db: str | None = None
    review_all_idc: bool = False
    batch_max_files: int = 1000
    batch_max_unzipped_bytes: int = 50_000_000

    def check(self) -> None:
        _require(0 <= self.port < 65536, "port", "must be a TCP port number (0..65535)")
        _require(self.threads > 0, "threads", "must be positive")
        _require(0 < self.connection_limit <= 4000, "connection_limit", "must be in 1..4000")
        _require(0 < self.idle_timeout <= 600, "idle_timeout", "must be 1..600 seconds")
        _require(self.max_upload_bytes > 0, "max_upload_bytes", "must be positive")
        _require((self.tls_cert is None) == (self.tls_key is None), "tls_cert/tls_key", "give both or neither")
        _require(self.review_db is None or self.review_db.strip() != "", "review_db",
                 "must be a file path, or null for review.sqlite3 in the model directory")
        _require(0 < self.batch_max_files <= 100_000, "batch_max_files", "must be in 1..100000")
        _require(self.batch_max_unzipped_bytes > 0, "batch_max_unzipped_bytes", "must be positive")


@dataclasses.dataclass(frozen=True)
class MQTTSettings:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    keepalive: int = 60
    Location: str = "IDC"
    Zone: str = "Lab"
    Server: str = "EdgeServer"
    Alarm: str = "IoTAlarm"
    Tester: str = "InceptionTest"
    queue_size: int = 1000
    session_expiry: int = 86400
    stale_after_seconds: float = 300.0
    status_online: str = "ONLINE"
    status_offline: str = "OFFLINE"
    home_assistant: bool = False
    discovery_prefix: str = "homeassistant"

    def check(self) -> None:
        _require(0 < self.port < 65536, "port", "must be a TCP port number")
        _require(self.queue_size > 0, "queue_size", "must be positive")
        for key in ("Location", "Zone", "Server", "Alarm", "Tester"):
            value = getattr(self, key)
            _require(value and not set(value) & set("/+#"), key, "must be a non-empty topic level without / + #")
        names = [self.Server, self.Alarm, self.Tester]
        _require(len(set(names)) == 3, "Server/Alarm/Tester", "must be three different device names")
        # MQTT 5 session expiry interval: a 4-byte number of seconds.
        _require(0 <= self.session_expiry < 2 ** 32, "session_expiry", "must be 0..4294967295 seconds")
        _require(self.stale_after_seconds > 0, "stale_after_seconds", "must be positive")
        _require(self.status_online and self.status_offline and self.status_online != self.status_offline,
                 "status_online/status_offline", "must be two different non-empty strings")
        _require(bool(re.fullmatch(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*", self.discovery_prefix)),
                 "discovery_prefix", "must be a topic prefix of letters, digits, _ and - (e.g. homeassistant)")


@dataclasses.dataclass(frozen=True)
class AlarmSettings:
    red_led_pin: int = 17
    blue_led_pin: int = 27
    buzzer_pin: int = 22
    button_pin: int | None = None
    buzzer_seconds: float = 5.0
    topics: list[str] = _fresh(["IDC/Devices/Lab/EdgeServer/Sensors"])
    max_payload_bytes: int = 4096
    state_file: str | None = "alarm-state.json"  # what the alarm has shown (survives its restarts); null: kept in memory only

    def check(self) -> None:
        _require(self.buzzer_seconds >= 0, "buzzer_seconds", "must not be negative")
        _require(self.state_file is None or self.state_file.strip() != "", "state_file",
                 "must be a file path, or null to keep it in memory only")
        _require(len(self.topics) > 0, "topics", "must list at least one topic filter")


@dataclasses.dataclass(frozen=True)
class SlidesSettings:
    watch_dir: str | None = None  # the scanner's share: the server processes each slide that appears here
    output_dir: str | None = None  # null: slides/ in the model directory
    default_mpp: float | None = None  # level-0 um per pixel of slides whose file does not say
    min_tissue: float = 0.1  # share of a tile that must be tissue for it to be classified
    batch_size: int = 16  # tiles per inference call (with 4-view TTA the trunk sees 4 times as many)
    poll_seconds: float = 10.0  # how often the server looks in watch_dir
    max_upload_bytes: int = 4_000_000_000
    review_flagged: bool = True  # the server queues each slide's needs-review tiles for the review station

    def check(self) -> None:
        _require(self.watch_dir is None or self.watch_dir.strip() != "", "watch_dir", "must be a folder or null")
        _require(self.output_dir is None or self.output_dir.strip() != "", "output_dir", "must be a folder or null")
        _require(self.default_mpp is None or self.default_mpp > 0, "default_mpp", "must be null or positive")
        _require(0.0 < self.min_tissue <= 1.0, "min_tissue", "must be a share in (0, 1]")
        _require(self.batch_size > 0, "batch_size", "must be positive")
        _require(self.poll_seconds > 0, "poll_seconds", "must be positive")
        _require(self.max_upload_bytes > 0, "max_upload_bytes", "must be positive")


@dataclasses.dataclass(frozen=True)
class Config:
    ClassifierSettings: ClassifierSettings
    OpenVINO: OpenVINOSettings
    Server: ServerSettings
    IoTJumpWay: MQTTSettings
    Alarm: AlarmSettings
    Slides: SlidesSettings
    path: Path = dataclasses.field(compare=False, default=DEFAULT_CONFIG)

    @property
    def root(self) -> Path:
        return self.path.parent

    def resolve(self, path: str | Path) -> Path:
        """An absolute path, with relative ones taken from the project root."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else (self.root / path).resolve()

    @property
    def model_dir(self) -> Path:
        return self.resolve(self.ClassifierSettings.model_dir)

    @property
    def model(self) -> ModelDir:
        """The model directory's layout (idc.core.bundle)."""
        return ModelDir(self.model_dir, self.ClassifierSettings.model_name)

    @property
    def slides_dir(self) -> Path:
        """Where the slides' outputs go: Slides.output_dir, or slides/ in the model directory."""
        return self.resolve(self.Slides.output_dir) if self.Slides.output_dir else self.model.slides

    @property
    def classifier(self) -> ClassifierSettings:
        return self.ClassifierSettings

    @property
    def mqtt(self) -> MQTTSettings:
        return self.IoTJumpWay


class _KeyError(Exception):
    """Internal: a bad key, before the section and file are known."""

    def __init__(self, key: str, why: str):
        super().__init__(key, why)
        self.key, self.why = key, why


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise _KeyError(key, why)


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        key_t, value_t = typing.get_args(annotation)
        return isinstance(value, dict) and all(_type_ok(v, value_t) for v in value.values())
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build_section(cls, raw, section: str, path: Path):
    where = f"in section {section!r} of {path}"
    if not isinstance(raw, dict):
        raise ConfigError(f"section {section!r} of {path} must be a JSON object")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in raw]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        # A typo makes a key both unknown and missing: name the typo and suggest the valid key.
        close = difflib.get_close_matches(unknown[0], missing or names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f" (known keys: {', '.join(names)})"
        raise ConfigError(f"unknown key {unknown[0]!r} {where}{hint}")
    present = [n for n in names if n in raw]  # the missing ones take the dataclass's defaults
    for name in present:
        if not _type_ok(raw[name], hints[name]):
            raise ConfigError(
                f"key {name!r} {where} must be {_type_name(hints[name])}, got {raw[name]!r}"
            )
    values = {n: (float(raw[n]) if hints[n] is float else raw[n]) for n in present}
    settings = cls(**values)
    try:
        settings.check()
    except _KeyError as err:
        raise ConfigError(f"key {err.key!r} {where}: {err.why}") from None
    return settings


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate confs.json (the project's own when `path` is None)."""
    path = Path(path or DEFAULT_CONFIG).expanduser().resolve()
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object of sections")
    sections, defaulted = {}, []
    for name, cls in typing.get_type_hints(Config).items():
        if name == "path":
            continue
        sections[name] = _build_section(cls, raw.get(name, {}), name, path)
        if name not in raw:
            defaulted.append(f"section {name!r} (all its keys)")
        elif missing := [f.name for f in dataclasses.fields(cls) if f.name not in raw[name]]:
            defaulted.append(f"{', '.join(map(repr, missing))} of section {name!r}")
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r} in {path}")
    if defaulted:
        log.debug("%s lacks %s: the defaults are used", path, "; ".join(defaulted))
    return Config(**sections, path=path)


def with_overrides(config: Config, section: str, flags: dict[str, str] | None = None, **changes) -> Config:
    """A copy of `config` with some keys of one section replaced (used by --flags and tests).

    A bad value is a ConfigError naming the command-line option (`flags` maps keys to option
    names; by default `--key-with-dashes`), worded like a bad confs.json value."""
    updated = dataclasses.replace(getattr(config, section), **changes)
    try:
        updated.check()
    except _KeyError as err:
        keys = [k for k in changes if k in err.key.split("/")] or list(changes)
        option = (flags or {}).get(keys[0], "--" + keys[0].replace("_", "-"))
        raise ConfigError(f"{option} {changes[keys[0]]}: {err.why} (overrides {section}.{keys[0]})") from None
    return dataclasses.replace(config, **{section: updated})
