"""Compile the trained Keras model to OpenVINO IR (FP32, FP16, INT8 via NNCF) and check each IR
against TensorFlow on validation patients. Run through ./compile_ncs.sh.

  python -m idc.edge.compile --precision FP16 INT8

Runs where the model was trained (it needs TensorFlow to read the Keras model); the IRs it writes
to model/ir/<PRECISION>/ carry the model's bundle (model.json, with the precision added), so the
edge box needs nothing else. Both sides of the parity check run through the engine the server uses.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time

import numpy as np
from tqdm import tqdm

from idc.core import cli
from idc.core.bundle import PRECISIONS, Bundle, Patch
from idc.core.config import Config, with_overrides
from idc.core.errors import DatasetError, ParityError
from idc.keras_model import load_keras_model
from idc.core.metrics import classification_metrics
from idc.core.preprocessing import decode_image, preprocess
from idc.edge.engine import KerasClassifier, OpenVINOClassifier, check_device, compiled_precisions, served_precision

log = logging.getLogger(__name__)

MAX_INT8_BALANCED_ACCURACY_DROP = 0.01


def _sample(patches: list[Patch], limit: int, seed: int) -> list[Patch]:
    rng = np.random.default_rng(seed)
    return [patches[i] for i in sorted(rng.permutation(len(patches))[:limit])]


def convert(keras_model, image_size: int):
    """Keras 3 -> SavedModel -> OpenVINO model with a dynamic batch dimension."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        keras_model.export(tmp, format="tf_saved_model", verbose=False)
        return ov.convert_model(tmp, input=[-1, image_size, image_size, 3])


def quantize_int8(ov_model, calibration: np.ndarray):
    """Post-training INT8 quantization with NNCF, calibrated on real training patches (one
    patch per calibration sample, as NNCF counts them)."""
    nncf = cli.quiet_import("nncf")
    samples = [calibration[i:i + 1] for i in range(len(calibration))]
    # Only the convolutions of the trunk are quantized: the pooled statistics (a variance is a
    # difference of nearly equal numbers) and the small head stay in floating point. The full bias
    # correction, not NNCF's fast one: on the validation patches of the default model it kept balanced
    # accuracy within 0.0010 of TensorFlow's, where the fast one lost 0.0120 (docs/edge.md).
    keep_float = nncf.IgnoredScope(types=["ReduceMean", "Subtract", "Multiply", "Sqrt", "MatMul", "Softmax"],
                                   validate=False)
    return nncf.quantize(ov_model, nncf.Dataset(samples), subset_size=len(samples),
                         preset=nncf.QuantizationPreset.MIXED, ignored_scope=keep_float, fast_bias_correction=False)


def compile_ir(config: Config, precisions: list[str]) -> dict[str, str]:
    """Write model/ir/<PRECISION>/<model_name>.xml (+ .bin, model.json) for each precision."""
    import openvino as ov

    model = config.model
    check_device(ov.Core(), config.OpenVINO.device)  # before anything is built or overwritten
    bundle = Bundle.load(model.root)
    ov_model = convert(load_keras_model(model.keras_model, bundle.external_trunk), bundle.image_size)
    written = {}
    for precision in precisions:
        started = time.time()
        out = model.ir_dir(precision)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        compiled = ov_model
        if precision == "INT8":
            train = _sample(model.read_manifest("train"), config.OpenVINO.calibration_samples,
                            config.classifier.random_seed)
            log.info("INT8: calibrating on %d training patches", len(train))
            calibration = preprocess([decode_image(p.path) for p in train], bundle.image_size)
            compiled = quantize_int8(ov_model.clone(), calibration)
        ov.save_model(compiled, model.ir_xml(precision), compress_to_fp16=precision == "FP16")
        bundle.for_ir(precision, ov.get_version()).save(out)
        written[precision] = model.ir_xml(precision)
        log.info("%s IR written to %s in %.1f s", precision, written[precision], time.time() - started)
    return written


def check_parity(config: Config, precisions: list[str], samples: int = 500, echo=print,
                 max_int8_drop: float = MAX_INT8_BALANCED_ACCURACY_DROP, keep_going: bool = False) -> dict:
    """Compare each IR with the Keras model on validation patches (test ones if none), both run
    through the engine at the bundle's decision rule. An INT8 IR that loses more than
    `max_int8_drop` balanced accuracy is removed, and ParityError raised unless `keep_going`
    (OpenVINO.precision "auto", which then serves FP16)."""
    model = config.model
    patches = model.read_manifest("validation") or model.read_manifest("test")
    if not patches:
        raise DatasetError(f"no validation or test patches in {model.manifest} to check the IRs on")
    chosen = _sample(patches, samples, config.classifier.random_seed)
    images, labels = [decode_image(p.path) for p in chosen], np.array([p.label for p in chosen])
    batches = [images[i:i + 64] for i in range(0, len(images), 64)]

    def run(engine, name: str) -> np.ndarray:  # with a progress bar on a terminal (stderr)
        return np.concatenate([engine.probabilities(batch)
                               for batch in tqdm(batches, desc=f"parity: {name}", unit="batch", disable=None)])

    echo(f"Checking {', '.join(precisions)} against TensorFlow on {len(chosen)} validation patches ...")
    reference_engine = KerasClassifier(model.keras_model, max_side=None)
    threshold = reference_engine.threshold
    reference = run(reference_engine, "TensorFlow")
    tf_metrics = classification_metrics(labels, reference, threshold)
    report = {"patches": len(labels), "threshold": threshold,
              "tensorflow": {"balanced_accuracy": tf_metrics["balanced_accuracy"]}}
    echo(f"Parity on {len(labels)} validation patches (threshold {threshold}); "
         f"TensorFlow balanced accuracy {tf_metrics['balanced_accuracy']:.4f}")
    failures = []
    for precision in precisions:
        engine = OpenVINOClassifier(model.ir_xml(precision), config.OpenVINO.device)
        p = run(engine, precision)
        agreement = float(((p >= threshold) == (reference >= threshold)).mean())
        balanced = classification_metrics(labels, p, threshold)["balanced_accuracy"]
        drop = tf_metrics["balanced_accuracy"] - balanced
        report[precision] = {"agreement": agreement, "max_abs_diff": float(np.abs(p - reference).max()),
                             "balanced_accuracy": balanced, "balanced_accuracy_drop": drop}
        echo(f"  {precision}: agreement {agreement:.4f}, largest |dP| {report[precision]['max_abs_diff']:.4f}, "
             f"balanced accuracy {balanced:.4f} ({-drop:+.4f} vs TensorFlow)")
        if precision == "INT8" and drop > max_int8_drop:
            failures.append(f"INT8 loses {drop:.4f} balanced accuracy against TensorFlow (limit {max_int8_drop}); "
                            "calibrate on more patches (OpenVINO.calibration_samples) or use FP16")
            report[precision]["removed"] = True
            shutil.rmtree(model.ir_dir(precision))  # never left for "auto" (or anyone) to serve
    model.parity_report.write_text(json.dumps(report, indent=2))
    if failures and not keep_going:
        raise ParityError("; ".join(failures) + " (the INT8 IR is removed)")
    for failure in failures:
        echo(f"  {failure}: the INT8 IR is removed and FP16 is served")
    return report


def main() -> int:
    p = cli.parser("Compile the trained model to OpenVINO IR and check it against TensorFlow")
    p.add_argument("--precision", nargs="+", type=str.upper, choices=PRECISIONS,
                   help="FP32, FP16, INT8 (any case; default: OpenVINO.precision, where auto compiles FP16, and INT8 on a CPU)")
    p.add_argument("--device", help="OpenVINO device for the checks (default: OpenVINO.device)")
    p.add_argument("--parity-samples", type=int, default=500, help="validation patches to compare (default: 500)")
    p.add_argument("--max-int8-drop", type=float, default=MAX_INT8_BALANCED_ACCURACY_DROP,
                   help="largest balanced-accuracy loss allowed for INT8 (default: %(default)s)")
    args = p.parse_args()
    config = cli.setup(args)
    if args.device:
        config = with_overrides(config, "OpenVINO", device=args.device)
    auto = not args.precision and config.OpenVINO.precision == "auto"
    precisions = args.precision or (compiled_precisions(config.OpenVINO.device) if auto else [config.OpenVINO.precision])
    for precision, path in compile_ir(config, precisions).items():
        print(f"{precision}: {path}")
    check_parity(config, precisions, args.parity_samples, echo=lambda *lines: print(*lines, flush=True),
                 max_int8_drop=args.max_int8_drop, keep_going=auto)
    if auto:
        print(f"Serving {served_precision(config)} on {config.OpenVINO.device} (OpenVINO.precision auto)")
    return 0


if __name__ == "__main__":
    cli.run(main)
