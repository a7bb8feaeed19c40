"""Evaluate the trained model on held-out patients (a sorted split or any Kaggle-layout folder).

The model runs through the engine the server uses (idc.edge.engine), at the bundle's input size
and decision rule: what is evaluated is what is served. `precision` picks the Keras model
("keras", the default) or a compiled IR (FP32, FP16, INT8), as the article compared the stick
with the development machine.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from idc.core import metrics
from idc.core.bundle import Patch
from idc.core.config import Config
from idc.core.context import apply_rule, describe_rule, rule_fields
from idc.core.errors import DatasetError, ImageError, ModelNotFoundError
from idc.core.preprocessing import decode_image
from idc.edge.engine import load_classifier
from idc.slides import stain as slide_stain
from idc.training import data, html_report, reports, stain

log = logging.getLogger(__name__)


def predict_patches(engine, patches: list[Patch], batch_size: int, print_every: int = 10, echo=print,
                    staining: stain.PatientStain | None = None, slide_stains: dict | None = None):
    """P(IDC) for each readable patch, printing the article's streaming accuracy lines; each decoded
    patch also goes into `staining` (its patient's stain statistics) when given. With `slide_stains`
    (each patient's slide_stain.Stain) and a bundle whose stain normalisation is per slide, each patch
    is normalised with its patient's stain before the engine sees it.

    Returns (kept patches, probabilities, skipped [(file, why)])."""
    kept, probabilities, skipped = [], [], []
    target = slide_stain.Stain.from_bundle(engine.bundle.stain_normalization) if slide_stains is not None else None
    correct = seen = 0
    steps = (len(patches) + batch_size - 1) // batch_size
    for step in range(steps):
        started = time.perf_counter()
        images, batch = [], []
        for patch in patches[step * batch_size:(step + 1) * batch_size]:
            try:
                images.append(decode_image(patch.path))
                batch.append(patch)
                if staining is not None:
                    staining.add(patch.patient, images[-1])
            except ImageError as err:
                skipped.append((str(patch.path), str(err)))
        if not batch:
            continue
        if target is not None:
            images = [slide_stain.normalise(image, slide_stains.get(x.patient), target) for image, x in zip(images, batch)]
        p = engine.probabilities(images)
        labels = np.array([x.label for x in batch])
        correct += int(((p >= 0.5) == labels).sum())
        seen += len(batch)
        kept += batch
        probabilities.append(p)
        if step == 0 or (step + 1) % print_every == 0 or step == steps - 1:  # the article's lines
            echo(f"INFO:tensorflow:Global Step {step + 1}: Streaming Accuracy: {correct / seen:.4f} "
                 f"({time.perf_counter() - started:.2f} sec/step)")
    echo(f"INFO:tensorflow:Final Streaming Accuracy: {correct / max(seen, 1):.4f}")
    return kept, (np.concatenate(probabilities) if probabilities else np.zeros(0)), skipped


def evaluate(config: Config, split: str = "test", data_dir: str | Path | None = None,
             report_dir: str | Path | None = None, echo=print, precision: str = "keras",
             threshold: float | None = None, review_band: float | None = None) -> dict:
    """Run the model on a split (or --data folder) through the engine, and write the full report."""
    model = config.model
    if data_dir is not None:
        patches, name = data.scan_dataset(data_dir), Path(data_dir).name
    else:
        patches, name = model.read_manifest(split), split
    if not patches:
        raise DatasetError(f"the {split!r} split in {model.manifest} is empty: nothing to evaluate "
                           "(re-sort with `python trainer.py sort`, or pick another --split)")
    if precision != "keras":
        name = f"{name}_{precision}"
    report_dir = Path(report_dir) if report_dir else model.report_dir(name)
    report_dir.mkdir(parents=True, exist_ok=True)

    engine = load_classifier(config, precision, threshold=threshold, review_band=review_band)
    if precision != "keras" and engine.backend == "keras":
        raise ModelNotFoundError(f"no {precision} IR in {model.ir_dir(precision)}: run "
                                 f"`./compile_ncs.sh --precision {precision}` first")
    echo(f"Evaluating {engine.backend} ({engine.image_size} px, threshold {engine.threshold}, review band "
         f"{engine.review_band}: {engine.rule_source}) on {len(patches)} patches ({name})")
    slide_stains = None
    if slide_stain.Stain.from_bundle(engine.bundle.stain_normalization):  # each patient's patches are a slide's
        slide_stains = slide_stain.patient_stains(patches)
        echo(f"Stain normalised per patient (the statistics of all their patches' tissue): {len(slide_stains)} patients, "
             f"{sum(s is None for s in slide_stains.values())} with too little tissue, left as they are")
    staining = stain.PatientStain()
    kept, p, skipped = predict_patches(engine, patches, config.classifier.batch_size, echo=echo, staining=staining,
                                       slide_stains=slide_stains)
    labels = np.array([x.label for x in kept])
    threshold = engine.threshold
    predicted, review = metrics.decide(p, threshold, engine.review_band)
    result = metrics.classification_metrics(labels, p, threshold)
    # Patients, not patches, are the independent units: intervals by bootstrap over patients.
    result["intervals_95"] = metrics.patient_bootstrap([x.patient for x in kept], labels, p, threshold,
                                                       seed=config.classifier.random_seed)
    correct = predicted == labels
    # The article's "average confidence of correct answers" (0.96 there): P of the class given.
    result["mean_confidence_correct"] = float(np.where(predicted == 1, p, 1 - p)[correct].mean()) \
        if correct.any() else float("nan")
    patients = metrics.per_patient([x.patient for x in kept], labels, p, threshold)
    result["staining"] = stain.annotate(patients, staining, _training_staining(config))
    false_negatives = (labels == 1) & (predicted == 0)
    result.update({
        "evaluated_on": name, "model": engine.describe(), "patients": len(patients), "skipped": len(skipped),
        "needs_review": int(review.sum()),
        # the article's second stage: how many of the missed IDC patches a human would still see
        "false_negatives_flagged_for_review": int((false_negatives & review).sum()),
        "streaming_accuracy_at_0.5": float(((p >= 0.5) == labels).mean()),
    })

    if engine.bundle.slide_context:  # patients classified together: their neighbours inform each patch
        result["slide_context"] = slide_context_metrics(kept, labels, p, engine.bundle.slide_context,
                                                        config.classifier.random_seed)

    rows = [{"file": str(x.path), "patient": x.patient, "x": x.x, "y": x.y, "label": x.label,
             "p_idc": round(float(pi), 6), "predicted": int(pr), "needs_review": bool(rv)}
            for x, pi, pr, rv in zip(kept, p, predicted, review)]
    reports.write_csv(report_dir / "predictions.csv", rows, reports.PREDICTION_FIELDS)
    for csv_name, label in (("false_negatives.csv", 1), ("false_positives.csv", 0)):
        wrong = [r for r in rows if r["label"] == label and r["predicted"] != label]
        reports.write_csv(report_dir / csv_name, wrong, reports.PREDICTION_FIELDS)
    reports.write_csv(report_dir / "per_patient.csv", patients, list(patients[0]))
    reports.save_json(report_dir / "metrics.json", result)
    plots = reports.plot_report(report_dir, labels, p, threshold,
                                {"head": model.history("head"), "fine-tuning": model.history("fine_tune"),
                                  "patch CNN": model.history("patch_cnn")})
    plots += [path for path in [stain.plot(report_dir, patients)] if path is not None]
    heatmaps = html_report.save_patient_heatmaps(report_dir, rows)
    gallery = html_report.save_gallery(report_dir, *missed_and_nearest_negatives(config, engine, rows))
    index = html_report.write_index(report_dir, result, patients, plots, heatmaps, gallery, _tradeoff(model))
    _log_to_tensorboard(model.log_dir(f"evaluation_{name}"), result)

    echo(summary(result))
    if skipped:
        echo(f"skipped {len(skipped)} unreadable images, e.g. {skipped[0][0]}: {skipped[0][1]}")
    echo(f"report: {index} ({len(plots)} plots, {len(heatmaps)} slide heatmaps, predictions.csv, metrics.json)")
    return result


def _training_staining(config: Config) -> dict | None:
    """The training patients' staining (idc.training.stain.reference), the yardstick of each evaluated
    patient's stain distance; None where the sorted training patches are not here (e.g. an edge box)."""
    try:
        patches = config.model.read_manifest("train")
    except DatasetError:
        patches = []
    ref = stain.reference(patches, seed=config.classifier.random_seed) if patches else None
    if ref is None:
        log.info("no sorted training patches in %s: the report gives each patient's staining without "
                 "its distance from the training patients'", config.model.root)
    return ref


def missed_and_nearest_negatives(config: Config, engine, rows: list[dict], shown: int = 24, neighbours: int = 4,
                                 pool: int = 3000) -> tuple[list[dict], list[list[dict]]]:
    """The most confidently missed IDC patches and, for each, the nearest patches without IDC in the
    trunk's feature space (among up to `pool` negatives, drawn with the seed). The trunk is the Keras
    model's: the engine's own when it is that model, else loaded (an IR has no feature output)."""
    missed = sorted((r for r in rows if r["label"] == 1 and r["predicted"] == 0), key=lambda r: r["p_idc"])[:shown]
    negatives = [r for r in rows if r["label"] == 0]
    if not missed or not negatives:
        return [], []
    if engine.backend == "keras":
        model = engine.model
    elif config.model.keras_model.exists():
        from idc.keras_model import load_keras_model

        model = load_keras_model(config.model.keras_model, engine.bundle.external_trunk)
    else:
        log.warning("no Keras model at %s: the report has no gallery of nearest negatives", config.model.keras_model)
        return [], []
    from idc.core.preprocessing import load_batch

    rng = np.random.default_rng(config.classifier.random_seed)
    negatives = [negatives[i] for i in sorted(rng.choice(len(negatives), min(pool, len(negatives)), replace=False))]
    trunk = feature_extractor(model)
    batch = config.classifier.batch_size

    def features(items):
        return np.concatenate([np.asarray(trunk.predict_on_batch(load_batch([r["file"] for r in items[i:i + batch]],
                                                                            engine.image_size)))
                               for i in range(0, len(items), batch)])

    nearest = html_report.nearest(features(missed), features(negatives), neighbours)
    return missed, [[negatives[j] for j in row] for row in nearest]


def feature_extractor(model):
    """The trained model's trunk: the sub-model whose output the head takes (named "trunk" by build_trunk; a
    custom trunk keeps its own name), not the patch CNN beside it; behind the stain normaliser, if any."""
    import keras

    from idc.keras_model import ReinhardNormalization
    from idc.training.model import with_normalizer

    width = model.get_layer("head").input_shape[-1]
    trunk = next(layer for layer in model.layers
                 if isinstance(layer, keras.Model) and layer.name != "head" and layer.output_shape[-1] == width)
    normalizer = next((layer for layer in model.layers if isinstance(layer, ReinhardNormalization)), None)
    return with_normalizer(trunk, normalizer)


def _tradeoff(model) -> list[dict] | None:
    """The validation trade-off recorded when the decision rule was chosen (training.json)."""
    if not model.training_record.exists():
        return None
    rule = json.loads(model.training_record.read_text()).get("decision_rule") or {}
    return (rule.get("validation") or {}).get("tradeoff")


def slide_context_metrics(patches: list[Patch], labels: np.ndarray, p: np.ndarray, rule: dict, seed: int) -> dict:
    """The metrics when each patch's neighbours on the slide inform its decision (the bundle's rule)."""
    patients = [x.patient for x in patches]
    p_context = apply_rule(rule, patients, [x.x for x in patches], [x.y for x in patches], p)
    result = metrics.classification_metrics(labels, p_context, rule["threshold"])
    result["intervals_95"] = metrics.patient_bootstrap(patients, labels, p_context, rule["threshold"], seed=seed)
    return {**rule_fields(rule), **result}


def _metric_lines(result: dict) -> list[str]:
    names = ["accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1_idc", "roc_auc"]
    intervals = result.get("intervals_95", {})
    lines = [f"  {n:<18} {result[n]:.4f}" + (f"  95% CI [{intervals[n][0]:.4f}, {intervals[n][1]:.4f}]"
                                             if n in intervals else "") for n in names]
    cm = result["confusion_matrix"]
    return lines + [f"  confusion matrix   TN {cm['tn']}  FP {cm['fp']}  FN {cm['fn']}  TP {cm['tp']}"]


def summary(result: dict) -> str:
    cm = result["confusion_matrix"]
    lines = [f"Evaluated {result['patches']} patches of {result['patients']} patients "
             f"({result['evaluated_on']}) at threshold {result['threshold']}, each patch alone:"]
    lines += _metric_lines(result)
    lines.append(f"  needs review       {result['needs_review']} patches, holding "
                 f"{result['false_negatives_flagged_for_review']} of the {cm['fn']} false negatives")
    lines.append(f"  average confidence of correct answers {result['mean_confidence_correct']:.4f}")
    context = result.get("slide_context")
    if context:
        lines.append(f"With slide context ({describe_rule(context)}) at threshold {context['threshold']}:")
        lines += _metric_lines(context)
    lines.append("  (95% CI: bootstrap over patients, 1000 rounds)")
    lines += stain.summary_lines(result.get("staining"))
    return "\n".join(lines)


def _log_to_tensorboard(log_dir: Path, result: dict) -> None:
    import tensorflow as tf

    with tf.summary.create_file_writer(str(log_dir)).as_default():
        for key, value in result.items():
            if isinstance(value, float) and np.isfinite(value):
                tf.summary.scalar(f"evaluation/{key}", value, step=0)
