"""Compile the trained Keras model to OpenVINO IR (FP32, FP16, INT8 via NNCF) and check it
against TensorFlow on validation patients. Run through ./compile_ncs.sh.

  python -m idc.edge_compile --precision FP16 INT8
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from idc import cli, data
from idc.config import Config
from idc.errors import IDCError
from idc.evaluation import load_keras_model
from idc.inference import OpenVINOClassifier, ir_dir, ir_path
from idc.metrics import classification_metrics
from idc.preprocessing import decode_image, preprocess
from idc.training import model_path

log = logging.getLogger(__name__)

PRECISIONS = ("FP32", "FP16", "INT8")
MAX_INT8_BALANCED_ACCURACY_DROP = 0.01


class ParityError(IDCError):
    """The compiled model disagrees with TensorFlow more than allowed."""


def _images(patches: list[data.Patch], limit: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    chosen = [patches[i] for i in sorted(rng.permutation(len(patches))[:limit])]
    return [decode_image(p.path) for p in chosen], np.array([p.label for p in chosen])


def convert(keras_model, image_size: int):
    """Keras 3 -> SavedModel -> OpenVINO model with a dynamic batch dimension."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        keras_model.export(tmp, format="tf_saved_model", verbose=False)
        return ov.convert_model(tmp, input=[-1, image_size, image_size, 3])


def quantize_int8(ov_model, calibration: np.ndarray, batch_size: int):
    """Post-training INT8 quantization with NNCF, calibrated on real training patches."""
    import nncf

    batches = [calibration[i:i + batch_size] for i in range(0, len(calibration), batch_size)]
    # Only the convolutions of the trunk are quantized: the pooled statistics (a variance is a
    # difference of nearly equal numbers) and the small head stay in floating point.
    keep_float = nncf.IgnoredScope(types=["ReduceMean", "Subtract", "Multiply", "Sqrt", "MatMul", "Softmax"],
                                   validate=False)
    return nncf.quantize(ov_model, nncf.Dataset(batches), subset_size=len(calibration),
                         preset=nncf.QuantizationPreset.MIXED, ignored_scope=keep_float)


def compile_ir(config: Config, precisions: list[str]) -> dict[str, Path]:
    """Write model/ir/<PRECISION>/<model_name>.xml (+ .bin, model.json) for each precision."""
    import openvino as ov

    settings = config.classifier
    keras_model = load_keras_model(model_path(config))
    image_size = int(keras_model.input_shape[1])
    ov_model = convert(keras_model, image_size)
    written = {}
    for precision in precisions:
        started = time.time()
        out = ir_dir(config, precision)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        model = ov_model
        if precision == "INT8":
            train = data.read_manifest(config.model_dir, "train")
            images, _ = _images(train, config.OpenVINO.calibration_samples, settings.random_seed)
            model = quantize_int8(ov_model.clone(), preprocess(images, image_size), settings.batch_size)
        ov.save_model(model, ir_path(config, precision), compress_to_fp16=precision == "FP16")
        (out / "model.json").write_text(json.dumps({
            "precision": precision, "image_size": image_size, "source": str(model_path(config)),
            "threshold": settings.InceptionThreshold, "compiled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "openvino": ov.get_version()}, indent=2))
        written[precision] = ir_path(config, precision)
        log.info("%s IR written to %s in %.1f s", precision, written[precision], time.time() - started)
    return written


def check_parity(config: Config, precisions: list[str], samples: int = 500, echo=print) -> dict:
    """Compare each IR with the Keras model on validation patches (test ones if none)."""
    settings = config.classifier
    patches = data.read_manifest(config.model_dir, "validation") or data.read_manifest(config.model_dir, "test")
    images, labels = _images(patches, samples, settings.random_seed)
    keras_model = load_keras_model(model_path(config))
    batch = preprocess(images, int(keras_model.input_shape[1]))
    reference = np.concatenate([np.asarray(keras_model.predict_on_batch(batch[i:i + 64]))[:, 1]
                                for i in range(0, len(batch), 64)])
    threshold = settings.InceptionThreshold
    tf_metrics = classification_metrics(labels, reference, threshold)
    report = {"patches": len(labels), "tensorflow": {"balanced_accuracy": tf_metrics["balanced_accuracy"]}}
    echo(f"Parity on {len(labels)} validation patches (threshold {threshold}); "
         f"TensorFlow balanced accuracy {tf_metrics['balanced_accuracy']:.4f}")
    failures = []
    for precision in precisions:
        engine = OpenVINOClassifier(ir_path(config, precision), config.OpenVINO.device, threshold, settings.review_band)
        p = np.concatenate([engine._infer(batch[i:i + 64]) for i in range(0, len(batch), 64)])
        agreement = float(((p >= threshold) == (reference >= threshold)).mean())
        balanced = classification_metrics(labels, p, threshold)["balanced_accuracy"]
        drop = tf_metrics["balanced_accuracy"] - balanced
        report[precision] = {"agreement": agreement, "max_abs_diff": float(np.abs(p - reference).max()),
                             "balanced_accuracy": balanced, "balanced_accuracy_drop": drop}
        echo(f"  {precision}: agreement {agreement:.4f}, largest |dP| {report[precision]['max_abs_diff']:.4f}, "
             f"balanced accuracy {balanced:.4f} ({-drop:+.4f} vs TensorFlow)")
        if precision == "INT8" and drop > MAX_INT8_BALANCED_ACCURACY_DROP:
            failures.append(f"INT8 loses {drop:.4f} balanced accuracy (limit {MAX_INT8_BALANCED_ACCURACY_DROP})")
    (config.model_dir / "ir" / "parity.json").write_text(json.dumps(report, indent=2))
    if failures:
        raise ParityError("; ".join(failures))
    return report


def main() -> int:
    p = cli.parser("Compile the trained model to OpenVINO IR and check it against TensorFlow")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, help="default: OpenVINO.precision")
    p.add_argument("--device", help="OpenVINO device for the checks (default: OpenVINO.device)")
    p.add_argument("--parity-samples", type=int, default=500, help="validation patches to compare")
    args = p.parse_args()
    config = cli.setup(args)
    if args.device:
        from idc.config import with_overrides

        config = with_overrides(config, "OpenVINO", device=args.device)
    precisions = args.precision or [config.OpenVINO.precision]
    for precision, path in compile_ir(config, precisions).items():
        print(f"{precision}: {path}")
    check_parity(config, precisions, args.parity_samples)
    return 0


if __name__ == "__main__":
    cli.run(main)
