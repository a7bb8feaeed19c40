"""The inference engine shared by inception_test.py and the server.

OpenVINO IR (the edge path; compiled once, infer requests reused from a pool, thread-safe)
or the trained Keras model as a fallback. Both apply THE preprocessing of training and the
same decision rule, so a patch gets the same answer everywhere.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from idc.config import Config
from idc.errors import IDCError, ModelNotFoundError
from idc.metrics import decide
from idc.preprocessing import decode_image, preprocess

log = logging.getLogger(__name__)

# The Movidius stick's plugin; OpenVINO dropped it after 2022.3.
LEGACY_DEVICES = {"MYRIAD": "the Movidius NCS (MYRIAD) plugin ended with OpenVINO 2022.3",
                  "HDDL": "the HDDL plugin ended with OpenVINO 2022.3"}


class DeviceError(IDCError):
    """The requested OpenVINO device is not present on this machine."""


@dataclass(frozen=True)
class Prediction:
    p_idc: float  # P(IDC)
    label: int  # 1 = IDC, 0 = no IDC (p_idc >= threshold)
    needs_review: bool  # p_idc close to the threshold: a human should look
    seconds: float = 0.0  # decode + preprocess + inference

    @property
    def message(self) -> str:
        return "IDC Detected!" if self.label else "IDC Not Detected!"


def ir_dir(config: Config, precision: str) -> Path:
    return config.model_dir / "ir" / precision


def ir_path(config: Config, precision: str) -> Path:
    return ir_dir(config, precision) / f"{config.classifier.model_name}.xml"


class Classifier:
    """Common decision logic; subclasses implement `_infer(batch) -> P(IDC) per row`."""

    backend = "base"

    def __init__(self, image_size: int, threshold: float, review_band: float, max_side: int | None = None):
        self.image_size, self.threshold, self.review_band = image_size, threshold, review_band
        self.max_side = max_side

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """P(IDC) for decoded RGB uint8 images."""
        return self._infer(preprocess(images, self.image_size))

    def classify(self, source: bytes | str | Path) -> Prediction:
        """Decode (bytes or a file), preprocess, infer, decide. Raises ImageError on bad input."""
        started = time.perf_counter()
        p = float(self.probabilities([decode_image(source, self.max_side)])[0])
        label, review = decide(p, self.threshold, self.review_band)
        return Prediction(p, int(label), bool(review), time.perf_counter() - started)

    def describe(self) -> dict:
        return {"backend": self.backend, "image_size": self.image_size, "threshold": self.threshold}


class OpenVINOClassifier(Classifier):
    """An OpenVINO IR compiled once for a device, with a pool of reusable infer requests."""

    def __init__(self, xml: Path, device: str, threshold: float, review_band: float,
                 max_side: int | None = None, requests: int = 4):
        import openvino as ov

        if not Path(xml).exists():
            raise ModelNotFoundError(f"no OpenVINO IR at {xml}: run ./compile_ncs.sh first")
        core = ov.Core()
        check_device(core, device)
        meta_path = Path(xml).with_name("model.json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        model = core.read_model(xml)
        image_size = meta.get("image_size") or int(model.input(0).get_partial_shape()[1].get_length())
        super().__init__(image_size, threshold, review_band, max_side)
        # LATENCY: the edge answers one image at a time, as fast as possible. f32: CPUs with
        # bfloat16 units would otherwise run FP32/FP16 IRs in bfloat16 and drift from TensorFlow.
        properties = {"PERFORMANCE_HINT": "LATENCY"}
        if device.split(":")[0] == "CPU":
            properties["INFERENCE_PRECISION_HINT"] = "f32"
        self.compiled = core.compile_model(model, device, properties)
        self.device, self.xml, self.precision = device, Path(xml), meta.get("precision", "?")
        self.backend = f"openvino-{self.precision}"
        self._requests: queue.Queue = queue.Queue()
        for _ in range(requests):
            self._requests.put(self.compiled.create_infer_request())

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
    """The trained Keras model (the fallback when no IR has been compiled)."""

    backend = "keras"

    def __init__(self, path: Path, threshold: float, review_band: float, max_side: int | None = None):
        from idc.evaluation import load_keras_model

        self.model = load_keras_model(Path(path))
        super().__init__(int(self.model.input_shape[1]), threshold, review_band, max_side)
        self.path = Path(path)
        self._lock = threading.Lock()

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:  # predict_on_batch runs a traced graph: much faster than eager calls
            return np.asarray(self.model.predict_on_batch(batch))[:, 1].astype(np.float32)

    def describe(self) -> dict:
        return {**super().describe(), "device": "CPU (TensorFlow)", "model": str(self.path)}


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


def load_classifier(config: Config, precision: str | None = None, prefer_ir: bool = True) -> Classifier:
    """The configured IR on the configured device, else the Keras model (and say so)."""
    settings = config.classifier
    common = {"threshold": settings.InceptionThreshold, "review_band": settings.review_band,
              "max_side": config.Server.max_image_side}
    xml = ir_path(config, precision or config.OpenVINO.precision)
    if prefer_ir and xml.exists():
        return OpenVINOClassifier(xml, config.OpenVINO.device, **common)
    from idc.training import model_path

    log.warning("no OpenVINO IR at %s: falling back to the Keras model (slower; run ./compile_ncs.sh)", xml)
    return KerasClassifier(model_path(config), **common)
