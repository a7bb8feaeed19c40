"""Retrain the final layer on cached bottlenecks, optionally fine-tune the top blocks, train the patch
CNN, export.

Outputs in model_dir (paths from idc.core.bundle.ModelDir): <model_name>.keras (trunk + head,
image in -> [P(no IDC), P(IDC)]), model.json (the bundle: what every consumer needs to use the
model), classes.txt, training.json (what was trained on what), logs/ (TensorBoard),
history_<phase>.csv, checkpoints/, backups/ (while a phase runs: what a killed job resumes from).

On a cluster every worker runs `train` (idc.training.distributed): each computes its share of the
bottleneck cache, all train data-parallel, and the chief alone writes the outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import time
from collections import Counter

from idc.core.cli import quiet_import

quiet_import("tensorflow")  # before Keras imports it: keeps TensorFlow's start-up noise out

import keras  # noqa: E402
import numpy as np

from idc.training import augment, bottleneck, calibration, data, distributed
from idc.core.bundle import CLASS_NAMES, Bundle
from idc.core.config import Config
from idc.core.context import GRID, describe_rule
from idc.core.errors import DatasetError
from idc.training.model import (build_classifier, build_head, build_patch_cnn, build_trunk, describe_weights,
                                fit_stain_normalizer, with_normalizer)
from idc.core.preprocessing import decode_image, load_batch, preprocess
from idc.slides import stain as slide_stain

log = logging.getLogger(__name__)

def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Inverse-frequency weights so that both classes count equally in the loss."""
    counts = np.bincount(labels, minlength=2)
    if counts.min() == 0:
        raise DatasetError(f"the training split needs patches of both classes, has {counts.tolist()}")
    return {label: len(labels) / (2.0 * count) for label, count in enumerate(counts)}


PHASES = ("head", "fine_tune", "patch_cnn")


def _run_id(config: Config, phase: str, *shape) -> str:
    """What a training phase's backup belongs to (settings, data, features): a backup of another run is not
    resumed. Folders are left out (each worker may see the shared one at another path): the data's
    fingerprint stands for them."""
    settings = {k: v for k, v in vars(config.classifier).items() if k not in ("dataset_dir", "model_dir", "patients_file")}
    text = json.dumps([phase, settings, config.model.fingerprint(), *shape], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def scan_shifts(features: bottleneck.CachedFeatures, digests: list[str], views: list[str], seed: int) -> np.ndarray | None:
    """How the features of each JPEG-compressed or blurred copy differ from those of the same patch as it
    is, in the same flip or rotation (about half the copies: the others lie in a flip/rotation no view
    holds); `features` holds `views` one after the other, each over the patches of `digests`. None
    without a JPEG or blur view."""
    row = {view: k * len(digests) for k, view in enumerate(views)}
    pairs = [(row[view] + i, row[twin] + i) for view in views if augment.is_jpeg_view(view) or augment.is_blur_view(view)
             for i, digest in enumerate(digests) if (twin := augment.view_twin(digest, view, seed)) in row]
    if not pairs:
        return None
    degraded, plain = (np.array(rows) for rows in zip(*pairs))
    return features.read(degraded) - features.read(plain)


def train_head(config: Config, train_x: bottleneck.CachedFeatures, train_y: np.ndarray,
               val_x: bottleneck.CachedFeatures | None = None, val_y: np.ndarray | None = None,
               shifts: np.ndarray | None = None):
    """Fit the head (feature standardisation, the hidden layer if any, softmax) on bottleneck features
    streamed from the cache, under this process's strategy; with `scan_invariance` > 0 and `shifts` (scan_shifts), it is also
    penalised for how far a scan's JPEG compression and blur move its answer. Returns (head, history of the
    epochs run, epoch started from)."""
    settings = config.classifier
    keras.utils.set_random_seed(settings.random_seed)
    # The standardisation is adapted on the training features a chunk at a time: they need not fit in memory.
    head = build_head(train_x.dim, train_x.chunks(), settings.l2_regularization, shifts, settings.scan_invariance,
                      settings.head_hidden_units, settings.random_seed)
    validation = distributed.Examples(val_y, lambda rows, epoch: val_x.read(rows)) \
        if val_x is not None and len(val_x) else None
    history, first_epoch = distributed.fit(
        head, distributed.Examples(train_y, lambda rows, epoch: train_x.read(rows)), validation,
        optimizer=lambda: keras.optimizers.Adam(settings.learning_rate), epochs=settings.epochs,
        batch_size=settings.head_batch_size, class_weight=class_weights(train_y) if settings.class_weighting else None,
        seed=settings.random_seed, patience=settings.early_stopping_patience, model_dir=config.model, phase="head",
        run_id=_run_id(config, "head", len(train_y), train_x.dim))
    if shifts is not None and settings.scan_invariance > 0:  # the penalty is for training: export plain L2
        exported = build_head(train_x.dim, l2=settings.l2_regularization)
        distributed.copy_weights(head, exported)
        head = exported
    return head, history, first_epoch


def image_reader(patches: list[data.Patch], image_size: int, seed: int, augmented: bool,
                 stain_jitter: dict[str, float] | None = None, jpeg: bool = False, blur: bool = False, shift: int = 0):
    """read(rows, epoch) -> the preprocessed images of patches[rows], decoded as they are needed. With
    `augmented`, each patch moved by up to `shift` px, in a random flip and 90-degree rotation,
    re-stained with `stain_jitter`, (with `jpeg`) half of them JPEG-compressed and (with `blur`) half of
    them blurred, drawn from (seed, epoch, patch): the same batches on one machine or on many, and after a
    resume."""
    def read(rows: np.ndarray, epoch: int) -> np.ndarray:
        images = [decode_image(patches[i].path) for i in rows]
        if augmented:
            images = [augment.augmented(image, np.random.default_rng([seed, epoch, int(i)]), stain_jitter, jpeg, blur,
                                        shift)
                      for image, i in zip(images, rows)]
        return preprocess(images, image_size)
    return read


def image_examples(settings, train: list[data.Patch], validation: list[data.Patch],
                   stain: dict[str, float] | None):
    """(training, validation) examples for the phases that train on decoded patches: the training ones
    augmented (moved by up to `random_shift` px; a flip or rotation; re-stained with `stain`; JPEG-compressed
    and blurred when the training views hold a JPEG or a blur view), the validation ones as they are (None
    if none)."""
    def labels(patches):
        return np.array([p.label for p in patches], dtype=np.int64)

    seed, size = settings.random_seed, settings.image_size
    jpeg = any(augment.is_jpeg_view(v) for v in settings.train_views)
    blur = any(augment.is_blur_view(v) for v in settings.train_views)
    return (distributed.Examples(labels(train), image_reader(train, size, seed, True, stain, jpeg, blur,
                                                                settings.random_shift)),
            distributed.Examples(labels(validation), image_reader(validation, size, seed, False)) if validation else None)


def unfreeze_blocks(trunk, blocks: int):
    """Make the top `blocks` Inception blocks of the trunk trainable: with `blocks` >= their number, every
    block that feeds the head, but never the stem (its early filters are generic, and training through it
    costs three times as much). BatchNorm stays in inference mode: small batches, pretrained statistics.
    Returns the inner model, or None for a trunk that is not a keras.applications model."""
    inner = next((layer for layer in trunk.layers if isinstance(layer, keras.Model)), None)
    if inner is None:
        return None
    names = [layer.name for layer in inner.layers]
    mixed = [name for name in names if name.startswith("mixed") and "_" not in name]
    if blocks < len(mixed):
        start = names.index(mixed[-blocks - 1]) + 1
    else:  # the stem ends with its last max pooling before the first block
        pools = [i for i, layer in enumerate(inner.layers[:names.index(mixed[0])])
                 if isinstance(layer, keras.layers.MaxPooling2D)]
        start = pools[-1] + 1 if pools else 0
    trunk.trainable = True
    for index, layer in enumerate(inner.layers):
        layer.trainable = index >= start and not isinstance(layer, keras.layers.BatchNormalization)
    return inner


def fine_tune(config: Config, classifier, trunk, train: list[data.Patch], validation: list[data.Patch]):
    """Train the top `fine_tune_blocks` Inception blocks (all those feeding the head, at most) and the head
    end to end at a low learning rate, on flipped and rotated patches, re-stained too when the training
    views include stain views; early stopping on the validation patients' loss."""
    settings = config.classifier
    if unfreeze_blocks(trunk, settings.fine_tune_blocks) is None:
        log.warning("fine-tuning needs a keras.applications trunk; skipped")
        return None
    stain = settings.stain_jitter if any(augment.is_stain_view(v) for v in settings.train_views) else None
    train_data, val_data = image_examples(settings, train, validation, stain)
    history, _ = distributed.fit(
        classifier, train_data, val_data, optimizer=lambda: keras.optimizers.Adam(settings.fine_tune_learning_rate),
        epochs=settings.fine_tune_epochs, batch_size=settings.batch_size,
        class_weight=class_weights(train_data.labels) if settings.class_weighting else None, seed=settings.random_seed,
        patience=settings.early_stopping_patience, model_dir=config.model, phase="fine_tune",
        run_id=_run_id(config, "fine_tune", len(train)))
    trunk.trainable = False
    return history


def train_patch_cnn(config: Config, train: list[data.Patch], validation: list[data.Patch], normalizer=None):
    """Train the patch CNN (model.build_patch_cnn) from scratch on flipped, rotated and re-stained patches
    (it learns colour from these patches alone, so it always sees stain jitter), with a cosine-decaying
    learning rate over `patch_cnn_epochs`; the epoch of lowest validation loss is kept. With a stain
    `normalizer`, it trains on the normalised patches, as the exported model will feed it.
    Returns (patch_cnn, history)."""
    settings = config.classifier
    keras.utils.set_random_seed(settings.random_seed)
    cnn = build_patch_cnn(settings.image_size, seed=settings.random_seed)
    train_data, val_data = image_examples(settings, train, validation, settings.stain_jitter)
    steps = settings.patch_cnn_epochs * max(1, len(train) // settings.batch_size)
    schedule = lambda: keras.optimizers.schedules.CosineDecay(settings.patch_cnn_learning_rate, steps, alpha=0.02)  # noqa: E731
    history, _ = distributed.fit(
        with_normalizer(cnn, normalizer), train_data, val_data, optimizer=lambda: keras.optimizers.Adam(schedule()),
        epochs=settings.patch_cnn_epochs, batch_size=settings.batch_size,
        class_weight=class_weights(train_data.labels) if settings.class_weighting else None, seed=settings.random_seed,
        patience=settings.early_stopping_patience, model_dir=config.model, phase="patch_cnn",
        run_id=_run_id(config, "patch_cnn", len(train)), full_batches=True)
    return cnn, history


def train(config: Config, trunk=None) -> dict:
    """The whole `trainer.py train` step; returns the training record (also in training.json).

    `trunk` replaces the configured Inception V3 (tests pass a tiny stand-in); on a cluster, make it after
    `distributed.strategy()`. Every worker of a cluster runs this; the chief alone writes the outputs."""
    chosen = distributed.strategy()  # first: a cluster's strategy must exist before TensorFlow runs anything
    me = distributed.worker()
    settings = config.classifier
    model = config.model
    started = time.time()
    splits = {split: model.read_manifest(split) for split in ("train", "validation")}
    if not splits["train"]:
        raise DatasetError(f"no training patches in {model.manifest}: run `python trainer.py sort` first")

    weights_id = describe_weights(settings.weights) if trunk is None else f"custom:{trunk.name}"
    if trunk is None:
        trunk = build_trunk(settings.weights, settings.image_size, settings.feature_layers, settings.pooling)
    # Stain normalisation, when configured, is the model's first layer; the trunk's features (and so the
    # cache's key) are those of the normalised images.
    normalizer = fit_stain_normalizer(settings.stain_normalization, [p.path for p in splits["train"]],
                                      settings.image_size)
    if normalizer is not None:
        log.info("stain normalisation: %s (fitted on %d training patches)", normalizer.describe(),
                 len(splits["train"]))
    extractor = with_normalizer(trunk, normalizer)
    features_id = weights_id if normalizer is None else f"{weights_id}; {normalizer.describe()}"
    # Training sees every view of each patch (augmentation); validation the patch as it is.
    views = {"train": settings.train_views, "validation": ["identity"]}
    digests, caches = {}, {}
    for split, patches in splits.items():
        paths = [p.path for p in patches]
        digests[split] = [bottleneck.file_digest(path) for path in paths]
        for view in views[split]:
            described = augment.describe_view(view, settings.stain_jitter, settings.random_seed)
            key = bottleneck.trunk_key(features_id, settings.feature_layers, settings.pooling,
                                       settings.image_size, described)
            cache = bottleneck.BottleneckCache(model.bottlenecks, key, view=view, stain_jitter=settings.stain_jitter,
                                               seed=settings.random_seed, worker=me.rank, workers=me.workers,
                                               description={
                "weights": features_id, "feature_layers": settings.feature_layers, "pooling": settings.pooling,
                "image_size": settings.image_size, "view": described})
            # Each worker computes its share of every view first, then waits for the others' shares (below).
            cache.compute(paths, extractor, settings.batch_size, settings.image_size, digests[split])
            caches[split, view] = cache
    features, labels, cache_stats = {}, {}, {}
    for split, patches in splits.items():
        cache_stats[split] = {"hits": 0, "computed": 0, **({"computed_by_other_workers": 0} if me.workers > 1 else {})}
        parts = []
        for view in views[split]:
            cache = caches[split, view]
            cache.wait_for(digests[split])
            parts.append(cache.lookup(digests[split]))  # streamed from the cache, never all in memory
            cache_stats[split]["hits"] += cache.hits
            cache_stats[split]["computed"] += cache.misses
            if me.workers > 1:
                cache_stats[split]["computed_by_other_workers"] += cache.from_other_workers
        features[split] = bottleneck.CachedFeatures.concat(parts)
        labels[split] = np.tile(np.array([p.label for p in patches], dtype=np.int64), len(views[split]))
    bottleneck_seconds = time.time() - started

    shifts = scan_shifts(features["train"], digests["train"], views["train"], settings.random_seed) \
        if settings.scan_invariance > 0 else None
    head, history, first_epoch = train_head(config, features["train"], labels["train"],
                                            features["validation"], labels["validation"], shifts)
    classifier = build_classifier(trunk, head, normalizer=normalizer)
    fine_tune_history = None
    if settings.fine_tune_blocks > 0:
        fine_tune_history = fine_tune(config, classifier, trunk, splits["train"], splits["validation"])
    elif me.chief:  # an earlier run's fine-tuning curves would be reported as this model's
        model.history("fine_tune").unlink(missing_ok=True)
    patch_cnn = patch_cnn_history = None
    if settings.patch_cnn_epochs > 0:
        patch_cnn, patch_cnn_history = train_patch_cnn(config, splits["train"], splits["validation"], normalizer)
    elif me.chief:
        model.history("patch_cnn").unlink(missing_ok=True)
    if settings.test_time_augmentation or patch_cnn is not None:
        classifier = build_classifier(trunk, head, settings.tta_views if settings.test_time_augmentation else (),
                                      patch_cnn, normalizer, settings.patch_cnn_weight)

    rule, validation_report = {"threshold": settings.InceptionThreshold, "review_band": settings.review_band,
                               "slide_context": None, "threshold_source": "confs.json"}, None
    if me.chief:
        stains, target = slide_stain_target(splits) if settings.stain_normalization == "slide" else (None, None)
        model.root.mkdir(parents=True, exist_ok=True)
        classifier.save(model.keras_model)
        model.classes_file.write_text("".join(f"{k} {v}\n" for k, v in CLASS_NAMES.items()))
        if settings.decision_rule_from_validation and splits["validation"]:
            rule, validation_report = choose_decision_rule(classifier, splits["validation"], settings.image_size,
                                                           settings.batch_size, settings.review_share, stains, target,
                                                           settings.slide_context_rule)
        bundle = Bundle.new(
            model_name=settings.model_name, image_size=settings.image_size,
            feature_layers=list(settings.feature_layers), pooling=settings.pooling,
            train_views=list(settings.train_views), test_time_augmentation=settings.test_time_augmentation,
            patch_cnn=patch_cnn is not None,
            patch_cnn_weight=settings.patch_cnn_weight if patch_cnn is not None else None,
            stain_normalization=stain_normalization(settings.stain_normalization, normalizer, target),
            microns_per_pixel=settings.microns_per_pixel, patch_pixels=GRID,
            weights=weights_id, data_fingerprint=model.fingerprint(), **rule)
        bundle.save(model.root)
    record = {
        "model": str(model.keras_model),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 1),
        "bottleneck_seconds": round(bottleneck_seconds, 1),
        "settings": vars(settings),
        "trunk": {"weights": weights_id, "feature_dim": int(features["train"].shape[1])},
        "bottleneck_cache": cache_stats,
        "cluster": {"strategy": type(chosen).__name__, "workers": me.workers, "worker": me.rank,
                    "replicas": chosen.num_replicas_in_sync},
        "data": {split: {"patients": len({p.patient for p in ps}),
                         "patches": dict(sorted(Counter(str(p.label) for p in ps).items()))}
                 for split, ps in splits.items()},
        "decision_rule": {**rule, "validation": validation_report} if me.chief else None,
        "resumed_from_epoch": first_epoch,  # 0, or the epoch a killed job's backup resumed the head at
        "epochs_run": len(history["loss"]),
        "head_history": {k: [round(float(v), 5) for v in vs] for k, vs in history.items()},  # every epoch
        "fine_tune_history": fine_tune_history and {k: [round(float(v), 5) for v in vs]
                                                    for k, vs in fine_tune_history.items()},
        "patch_cnn_history": patch_cnn_history and {k: [round(float(v), 5) for v in vs]
                                                    for k, vs in patch_cnn_history.items()},
        "versions": _versions(),
    }
    if not me.chief:
        return record
    model.training_record.write_text(json.dumps(record, indent=2))
    for phase in PHASES:  # what each finished phase left for a rerun of a job killed in a later one
        shutil.rmtree(model.backup(phase), ignore_errors=True)
    return record


def stain_normalization(method: str, normalizer, target) -> dict | None:
    """The bundle's stain_normalization: the model's layer's target, or the per-slide target, or None."""
    if normalizer is not None:
        return {"method": method, "target_mean": normalizer.target_mean, "target_std": normalizer.target_std}
    if target is not None:
        return {"method": method, "target_mean": list(target.mean), "target_std": list(target.std)}
    return None


def slide_stain_target(splits: dict) -> tuple[dict, slide_stain.Stain]:
    """Per-slide normalisation (idc.slides.stain) leaves the model as it is: (each training and validation
    patient's stain, the target: the training patients' typical stain)."""
    stains = slide_stain.patient_stains(splits["train"] + splits["validation"])
    training = {p.patient for p in splits["train"]}
    target = slide_stain.Stain.typical([stain for patient, stain in stains.items() if stain and patient in training])
    rounded = lambda values: "(" + ", ".join(f"{v:.4f}" for v in values) + ")"  # noqa: E731
    log.info("per-slide stain normalisation: target lab mean %s, std %s (the typical of %d training patients)",
             rounded(target.mean), rounded(target.std), len(training))
    return stains, target


def choose_decision_rule(classifier, validation: list[data.Patch], image_size: int, batch_size: int,
                         review_share: float, stains: dict | None = None, target: slide_stain.Stain | None = None,
                         context_rule: str = "weighted") -> tuple[dict, dict]:
    """Threshold and slide-context rule chosen on the validation patients, with the exported model
    (test-time augmentation included), as the bundle records them; with a per-slide `target`, on each
    patient's patches normalised with their `stains`, as evaluate.py classifies them. `context_rule`:
    the weighted mean's best radius and weight, or the learned rule fitted on these patients."""
    def batch(patches):
        if target is None:
            return load_batch([x.path for x in patches], image_size)
        return preprocess([slide_stain.normalise(decode_image(x.path), stains.get(x.patient), target)
                           for x in patches], image_size)

    p = np.concatenate([np.asarray(classifier.predict_on_batch(batch(validation[i:i + batch_size])))[:, 1]
                        for i in range(0, len(validation), batch_size)])
    labels = np.array([x.label for x in validation])
    threshold, balanced = calibration.best_threshold(labels, p)
    review = calibration.widest_review_band(labels, p, threshold, review_share)
    where = ([x.patient for x in validation], [x.x for x in validation], [x.y for x in validation])
    if context_rule == "learned":
        context = calibration.fit_learned_context(*where, labels, p)
    else:
        context = calibration.best_slide_context(*where, labels, p)
    # else patch-alone (the weighted mean's weight 0 is patch-alone, and wins unless context helps)
    helps = context["weight"] > 0 if context_rule == "weighted" else context["validation_balanced_accuracy"] > round(balanced, 4)
    patients = len({x.patient for x in validation})
    log.info("decision rule chosen on %d validation patients: threshold %.3f (balanced accuracy %.4f); review band "
             "%.3f (%.1f %% of patches, holding %s of the misses); slide context %s, threshold %.3f (%.4f)%s",
             patients, threshold, balanced, review["review_band"], 100 * review["share_flagged"], review["misses_held"],
             describe_rule(context), context["threshold"], context["validation_balanced_accuracy"],
             "" if helps else ": no better than patch-alone, not used")
    rule = {"threshold": threshold, "review_band": review["review_band"],
            "slide_context": context if helps else None,
            "threshold_source": f"validation: balanced accuracy {balanced:.4f} on {patients} patients"}
    return rule, {**review, "tradeoff": calibration.tradeoff(labels, p, review["review_band"])}


def _versions() -> dict:
    import tensorflow as tf

    return {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__}
