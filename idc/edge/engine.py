"""The inference engine shared by evaluation, inception_test.py, the server and the benchmarks.

OpenVINO IR (the edge path; compiled once, infer requests reused from a pool, thread-safe)
or the trained Keras model as a fallback. Both read the model's settings from its bundle
(model.json), apply THE preprocessing of training and the same decision rule, so a patch gets
the same answer everywhere. Serving an IR needs no TensorFlow.

Every engine finishes its initialisation before it is returned, including a first inference on
each of its infer requests: OpenVINO and pybind11 initialise statics on first use, and doing that
in several request threads at once deadlocked the server (one thread holding the GIL while
waiting on an OpenVINO static-initialisation guard, another holding pybind11's NumPy-API
call-once while waiting for the GIL).
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from idc.core.bundle import Bundle
from idc.core.config import Config
from idc.core.errors import DeviceError, ModelNotFoundError
from idc.core import metrics
from idc.core.preprocessing import decode_image, preprocess

log = logging.getLogger(__name__)

# The Movidius stick's plugin; OpenVINO dropped it after 2022.3.
LEGACY_DEVICES = {"MYRIAD": "the Movidius NCS (MYRIAD) plugin ended with OpenVINO 2022.3",
                  "HDDL": "the HDDL plugin ended with OpenVINO 2022.3"}


@dataclass(frozen=True)
class Prediction:
    p_idc: float  # P(IDC)
    label: int  # 1 = IDC, 0 = no IDC (p_idc >= threshold)
    needs_review: bool  # p_idc close to the threshold: a human should look
    seconds: float = 0.0  # decode + preprocess + inference

    @property
    def message(self) -> str:
        return "IDC Detected!" if self.label else "IDC Not Detected!"


def _blank_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (50, 50), (255, 255, 255)).save(buffer, "PNG")
    return buffer.getvalue()


class Classifier:
    """Common decision logic; subclasses implement `_infer(batch) -> P(IDC) per row`.

    `bundle` is the model's model.json, its decision rule possibly overridden
    (see decision_rule); `rule_source` says where the threshold and review band came from."""

    backend = "base"

    def __init__(self, bundle: Bundle, max_side: int | None = None, rule_source: str = "model bundle"):
        self.bundle, self.max_side, self.rule_source = bundle, max_side, rule_source
        self.image_size, self.threshold, self.review_band = bundle.image_size, bundle.threshold, bundle.review_band

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """P(IDC) for decoded RGB uint8 images (any number: one batch)."""
        return self._infer(preprocess(images, self.image_size))

    def decide(self, p_idc: float, seconds: float = 0.0) -> Prediction:
        """The decision rule on one P(IDC)."""
        label, review = metrics.decide(p_idc, self.threshold, self.review_band)
        return Prediction(float(p_idc), int(label), bool(review), seconds)

    def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        """Decoded images -> one Prediction each, in one inference call; `seconds` is each image's
        share of it."""
        started = time.perf_counter()
        probabilities = self.probabilities(images)
        share = (time.perf_counter() - started) / max(len(images), 1)
        return [self.decide(float(p), share) for p in probabilities]

    def classify(self, source: bytes | str | Path) -> Prediction:
        """Decode (bytes or a file), preprocess, infer, decide. Raises ImageError on bad input."""
        started = time.perf_counter()
        (prediction,) = self.predict([decode_image(source, self.max_side)])
        return replace(prediction, seconds=time.perf_counter() - started)

    def warm_up(self, rounds: int = 1) -> None:
        """Decode, preprocess and classify a blank patch `rounds` times, in the calling thread."""
        blank = _blank_png()
        for _ in range(rounds):
            self.classify(blank)

    def describe(self) -> dict:
        return {"backend": self.backend, "model_name": self.bundle.model_name, "image_size": self.image_size,
                "threshold": self.threshold, "review_band": self.review_band, "decision_rule": self.rule_source,
                "trained_at": self.bundle.created_at, "data_fingerprint": self.bundle.data_fingerprint[:12]}


class OpenVINOClassifier(Classifier):
    """An OpenVINO IR compiled once for a device, with a pool of reusable infer requests."""

    def __init__(self, xml: Path, device: str, bundle: Bundle | None = None, max_side: int | None = None,
                 requests: int = 4, rule_source: str = "model bundle"):
        import openvino as ov

        xml = Path(xml)
        if not xml.exists():
            raise ModelNotFoundError(f"no OpenVINO IR at {xml}: run ./compile_ncs.sh first")
        core = ov.Core()
        check_device(core, device)
        bundle = bundle or Bundle.load(xml.parent)
        model = core.read_model(xml)
        side = model.input(0).get_partial_shape()[1]
        if side.is_static and side.get_length() != bundle.image_size:
            raise ModelNotFoundError(f"{xml} takes {side.get_length()} px images but its model.json says "
                                     f"{bundle.image_size}: recompile with ./compile_ncs.sh")
        super().__init__(bundle, max_side, rule_source)
        # LATENCY: the edge answers one image at a time, as fast as possible. f32: CPUs with
        # bfloat16 units would otherwise run FP32/FP16 IRs in bfloat16 and drift from TensorFlow.
        properties = {"PERFORMANCE_HINT": "LATENCY"}
        if device.split(":")[0] == "CPU":
            properties["INFERENCE_PRECISION_HINT"] = "f32"
        self.compiled = core.compile_model(model, device, properties)
        self.device, self.xml, self.precision = device, xml, bundle.precision or "?"
        self.backend = f"openvino-{self.precision}"
        self._requests: queue.Queue = queue.Queue()
        for _ in range(requests):
            self._requests.put(self.compiled.create_infer_request())
        # Each infer request's first inference happens here, in the loading thread (see the module
        # doc): the pool is a FIFO, so `requests` rounds use every request once.
        self.warm_up(rounds=requests)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        request = self._requests.get()  # blocks while all requests are busy: thread-safe reuse
        try:
            result = request.infer({0: batch})
            return np.array(result[self.compiled.output(0)][:, 1], dtype=np.float32)
        finally:
            self._requests.put(request)

    def describe(self) -> dict:
        return {**super().describe(), "device": self.device, "precision": self.precision, "model": str(self.xml)}


class KerasClassifier(Classifier):
    """The trained Keras model (evaluation, and the fallback when no IR has been compiled)."""

    backend = "keras"

    def __init__(self, path: Path, bundle: Bundle | None = None, max_side: int | None = None,
                 rule_source: str = "model bundle"):
        from idc.keras_model import load_keras_model  # TensorFlow: only for this fallback

        path = Path(path)
        bundle = bundle or Bundle.load(path.parent)
        self.model = load_keras_model(path, bundle.external_trunk)
        if int(self.model.input_shape[1]) != bundle.image_size:
            raise ModelNotFoundError(f"{path} takes {self.model.input_shape[1]} px images but its model.json "
                                     f"says {bundle.image_size}: retrain with `python trainer.py train`")
        super().__init__(bundle, max_side, rule_source)
        self.path = path
        self._lock = threading.Lock()
        self.warm_up()  # traces the graph here, not in the first request

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:  # predict_on_batch runs a traced graph: much faster than eager calls
            return np.asarray(self.model.predict_on_batch(batch))[:, 1].astype(np.float32)

    def describe(self) -> dict:
        return {**super().describe(), "device": "CPU (TensorFlow)", "precision": "keras", "model": str(self.path)}


def check_device(core, device: str) -> None:
    """Fail clearly when a device is not here (e.g. MYRIAD on a current OpenVINO)."""
    wanted = device.split(":")[0]
    if wanted in ("AUTO", "MULTI", "HETERO", "BATCH"):
        return
    available = core.available_devices
    if not any(d == device or d.split(".")[0] == wanted for d in available):
        why = f" ({LEGACY_DEVICES[wanted]})" if wanted in LEGACY_DEVICES else ""
        raise DeviceError(f"OpenVINO device {device!r} is not available{why}; this machine has: "
                          f"{', '.join(available)}. Set OpenVINO.device in confs.json (CPU, GPU, NPU or AUTO).")


def decision_rule(bundle: Bundle, config: Config, threshold: float | None = None,
                  review_band: float | None = None) -> tuple[Bundle, str]:
    """The bundle with the decision rule that applies, and where it came from: a flag
    (--threshold, --review-band) wins over ClassifierSettings.threshold_override /
    review_band_override, which win over the trained values in model.json."""
    settings = config.classifier
    chosen, sources = {}, []
    for name, flag, setting in (("threshold", threshold, settings.threshold_override),
                                ("review_band", review_band, settings.review_band_override)):
        if flag is not None:
            chosen[name], where = flag, "--" + name.replace("_", "-")
        elif setting is not None:
            chosen[name], where = setting, f"confs.json {name}_override"
        else:
            continue
        sources.append(f"{name} from {where}")
    source = ", ".join(sources + ["the rest from model.json"]) if sources else "model.json"
    return bundle.with_decision_rule(chosen.get("threshold"), chosen.get("review_band")), source


def compiled_precisions(device: str) -> list[str]:
    """What `OpenVINO.precision: "auto"` compiles for a device: FP16, and INT8 on a CPU."""
    return ["FP16", "INT8"] if device.split(":")[0] == "CPU" else ["FP16"]


def served_precision(config: Config) -> str:
    """The IR that `OpenVINO.precision: "auto"` serves: INT8 on a CPU when compile_ncs.sh kept it
    (it is removed when it fails the parity gate), else FP16. On a CPU INT8 takes 0.36-0.50 of FP16's
    time (measured), within 0.01 balanced accuracy (docs/results.md); GPUs and NPUs run FP16 natively."""
    device = config.OpenVINO.device
    if "INT8" in compiled_precisions(device) and config.model.ir_xml("INT8").exists():
        return "INT8"
    return "FP16"


def load_classifier(config: Config, precision: str | None = None, threshold: float | None = None,
                    review_band: float | None = None) -> Classifier:
    """The IR of `precision` (default OpenVINO.precision; "auto": served_precision) on the configured
    device, else the Keras model (and say so); precision "keras" asks for the Keras model. Decision
    rule: decision_rule()."""
    model = config.model
    precision = precision or config.OpenVINO.precision
    if precision == "auto":
        precision = served_precision(config)
    max_side = config.Server.max_image_side
    if precision != "keras":
        xml = model.ir_xml(precision)
        if xml.exists():
            bundle, source = decision_rule(Bundle.load(xml.parent), config, threshold, review_band)
            return OpenVINOClassifier(xml, config.OpenVINO.device, bundle, max_side, rule_source=source)
        log.warning("no OpenVINO IR at %s: falling back to the Keras model (slower; run ./compile_ncs.sh)", xml)
    bundle, source = decision_rule(Bundle.load(model.root), config, threshold, review_band)
    return KerasClassifier(model.keras_model, bundle, max_side, rule_source=source)
