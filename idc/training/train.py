"""Retrain the final layer on cached bottlenecks, optionally fine-tune the top blocks, export.

Outputs in model_dir (paths from idc.core.bundle.ModelDir): <model_name>.keras (trunk + head,
image in -> [P(no IDC), P(IDC)]), model.json (the bundle: what every consumer needs to use the
model), classes.txt, training.json (what was trained on what), logs/ (TensorBoard),
history_<phase>.csv, checkpoints/.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections import Counter

import keras
import numpy as np

from idc.training import augment, bottleneck, calibration, data
from idc.core.bundle import CLASS_NAMES, Bundle
from idc.core.config import Config
from idc.core.errors import DatasetError
from idc.training.model import build_classifier, build_head, build_trunk, describe_weights
from idc.core.preprocessing import decode_image, preprocess

log = logging.getLogger(__name__)

def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Inverse-frequency weights so that both classes count equally in the loss."""
    counts = np.bincount(labels, minlength=2)
    if counts.min() == 0:
        raise DatasetError(f"the training split needs patches of both classes, has {counts.tolist()}")
    return {label: len(labels) / (2.0 * count) for label, count in enumerate(counts)}


def _callbacks(config: Config, phase: str, monitor_val: bool):
    model = config.model
    patience = config.classifier.early_stopping_patience
    model.checkpoint(phase).parent.mkdir(parents=True, exist_ok=True)
    callbacks = [
        keras.callbacks.TensorBoard(log_dir=str(model.log_dir(phase))),
        keras.callbacks.CSVLogger(str(model.history(phase))),
        keras.callbacks.ModelCheckpoint(str(model.checkpoint(phase)),
                                        monitor="val_loss" if monitor_val else "loss", save_best_only=True),
    ]
    if monitor_val:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                                       restore_best_weights=True, verbose=1))
    return callbacks


def train_head(config: Config, train_x, train_y, val_x=None, val_y=None):
    """Fit the new softmax layer (with feature standardisation) on bottleneck features."""
    settings = config.classifier
    keras.utils.set_random_seed(settings.random_seed)
    head = build_head(train_x.shape[1], train_x, settings.l2_regularization)
    head.compile(optimizer=keras.optimizers.Adam(settings.learning_rate),
                 loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    validation = (val_x, val_y) if val_x is not None and len(val_x) else None
    history = head.fit(
        train_x, train_y, validation_data=validation, epochs=settings.epochs,
        batch_size=settings.head_batch_size, shuffle=True, verbose=2,
        class_weight=class_weights(train_y) if settings.class_weighting else None,
        callbacks=_callbacks(config, "head", validation is not None),
    )
    return head, history.history


class AugmentedImages(keras.utils.PyDataset):
    """Batches of preprocessed images, with random flips and 90-degree rotations (fine-tuning)."""

    def __init__(self, images: list[np.ndarray], labels: np.ndarray, batch_size: int, image_size: int,
                 seed: int, augment: bool):
        super().__init__()
        self.images, self.labels, self.augment = images, labels, augment
        self.batch_size, self.image_size = batch_size, image_size
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(images)) if augment else np.arange(len(images))

    def __len__(self) -> int:
        return int(np.ceil(len(self.images) / self.batch_size))

    def __getitem__(self, index: int):
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        batch = [self.images[i] for i in rows]
        if self.augment:
            batch = [np.rot90(im[:, ::-1] if self.rng.random() < 0.5 else im, self.rng.integers(4)) for im in batch]
        return preprocess(batch, self.image_size), self.labels[rows]

    def on_epoch_end(self) -> None:
        if self.augment:
            self.rng.shuffle(self.order)


def fine_tune(config: Config, classifier, trunk, train: list[data.Patch], validation: list[data.Patch]):
    """Unfreeze the top `fine_tune_blocks` Inception blocks under the feature layer and train
    the whole model end to end at a low learning rate, with augmentation."""
    settings = config.classifier
    inner = next((layer for layer in trunk.layers if isinstance(layer, keras.Model)), None)
    if inner is None:
        log.warning("fine-tuning needs a keras.applications trunk; skipped")
        return None
    trunk.trainable = True
    mixed = [layer.name for layer in inner.layers if layer.name.startswith("mixed") and "_" not in layer.name]
    first = mixed[-settings.fine_tune_blocks - 1] if settings.fine_tune_blocks < len(mixed) else None
    trainable = first is None
    for layer in inner.layers:
        # BatchNorm stays in inference mode: the batches are small and the statistics pretrained.
        layer.trainable = trainable and not isinstance(layer, keras.layers.BatchNormalization)
        if layer.name == first:
            trainable = True
    labels = lambda ps: np.array([p.label for p in ps])  # noqa: E731
    load = lambda ps: [decode_image(p.path) for p in ps]  # noqa: E731
    train_data = AugmentedImages(load(train), labels(train), settings.batch_size, settings.image_size,
                                 settings.random_seed, augment=True)
    val_data = AugmentedImages(load(validation), labels(validation), settings.batch_size,
                               settings.image_size, settings.random_seed, augment=False)
    classifier.compile(optimizer=keras.optimizers.Adam(settings.fine_tune_learning_rate),
                       loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = classifier.fit(
        train_data, validation_data=val_data if validation else None, epochs=settings.fine_tune_epochs,
        class_weight=class_weights(labels(train)) if settings.class_weighting else None,
        callbacks=_callbacks(config, "fine_tune", bool(validation)), verbose=2)
    trunk.trainable = False
    return history.history


def train(config: Config, trunk=None) -> dict:
    """The whole `trainer.py train` step; returns the training record (also in training.json).

    `trunk` replaces the configured Inception V3 (tests pass a tiny stand-in)."""
    settings = config.classifier
    model = config.model
    started = time.time()
    splits = {split: model.read_manifest(split) for split in ("train", "validation")}
    if not splits["train"]:
        raise DatasetError(f"no training patches in {model.manifest}: run `python trainer.py sort` first")

    weights_id = describe_weights(settings.weights) if trunk is None else f"custom:{trunk.name}"
    if trunk is None:
        trunk = build_trunk(settings.weights, settings.image_size, settings.feature_layers, settings.pooling)
    features, labels, cache_stats = {}, {}, {}
    for split, patches in splits.items():
        # Training sees every view of each patch (augmentation); validation the patch as it is.
        views = settings.train_views if split == "train" else ["identity"]
        per_view, cache_stats[split] = [], {"hits": 0, "computed": 0}
        for view in views:
            described = augment.describe_view(view, settings.stain_jitter, settings.random_seed)
            key = bottleneck.trunk_key(weights_id, settings.feature_layers, settings.pooling,
                                       settings.image_size, described)
            cache = bottleneck.BottleneckCache(model.bottlenecks, key, view=view, stain_jitter=settings.stain_jitter,
                                               seed=settings.random_seed, description={
                "weights": weights_id, "feature_layers": settings.feature_layers, "pooling": settings.pooling,
                "image_size": settings.image_size, "view": described})
            if patches:
                per_view.append(cache.features([p.path for p in patches], trunk, settings.batch_size,
                                               settings.image_size))
            cache_stats[split]["hits"] += cache.hits
            cache_stats[split]["computed"] += cache.misses
        features[split] = np.concatenate(per_view) if per_view else np.zeros((0, 1), np.float32)
        labels[split] = np.tile(np.array([p.label for p in patches], dtype=np.int64), len(views))
    bottleneck_seconds = time.time() - started

    head, history = train_head(config, features["train"], labels["train"],
                               features["validation"], labels["validation"])
    classifier = build_classifier(trunk, head)
    fine_tune_history = None
    if settings.fine_tune_blocks > 0:
        fine_tune_history = fine_tune(config, classifier, trunk, splits["train"], splits["validation"])
    if settings.test_time_augmentation:
        classifier = build_classifier(trunk, head, settings.tta_views)

    model.root.mkdir(parents=True, exist_ok=True)
    classifier.save(model.keras_model)
    model.classes_file.write_text("".join(f"{k} {v}\n" for k, v in CLASS_NAMES.items()))
    rule, validation_report = {"threshold": settings.InceptionThreshold, "review_band": settings.review_band,
                               "slide_context": None, "threshold_source": "confs.json"}, None
    if settings.decision_rule_from_validation and splits["validation"]:
        rule, validation_report = choose_decision_rule(classifier, splits["validation"], settings.image_size,
                                                       settings.batch_size, settings.review_share)
    bundle = Bundle.new(
        model_name=settings.model_name, image_size=settings.image_size, feature_layers=list(settings.feature_layers),
        pooling=settings.pooling, train_views=list(settings.train_views),
        test_time_augmentation=settings.test_time_augmentation, weights=weights_id,
        data_fingerprint=model.fingerprint(), **rule)
    bundle.save(model.root)
    record = {
        "model": str(model.keras_model),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 1),
        "bottleneck_seconds": round(bottleneck_seconds, 1),
        "settings": vars(settings),
        "trunk": {"weights": weights_id, "feature_dim": int(features["train"].shape[1])},
        "bottleneck_cache": cache_stats,
        "data": {split: {"patients": len({p.patient for p in ps}),
                         "patches": dict(sorted(Counter(str(p.label) for p in ps).items()))}
                 for split, ps in splits.items()},
        "decision_rule": {**rule, "validation": validation_report},
        "epochs_run": len(history["loss"]),
        "head_history": {k: [round(float(v), 5) for v in vs] for k, vs in history.items()},
        "fine_tune_history": fine_tune_history and {k: [round(float(v), 5) for v in vs]
                                                    for k, vs in fine_tune_history.items()},
        "versions": _versions(),
    }
    model.training_record.write_text(json.dumps(record, indent=2))
    return record


def choose_decision_rule(classifier, validation: list[data.Patch], image_size: int, batch_size: int,
                         review_share: float) -> tuple[dict, dict]:
    """Threshold and slide-context rule chosen on the validation patients, with the exported model
    (test-time augmentation included), as the bundle records them."""
    p = np.concatenate([
        np.asarray(classifier.predict_on_batch(preprocess([decode_image(x.path) for x in validation[i:i + batch_size]],
                                                          image_size)))[:, 1]
        for i in range(0, len(validation), batch_size)])
    labels = np.array([x.label for x in validation])
    threshold, balanced = calibration.best_threshold(labels, p)
    review = calibration.widest_review_band(labels, p, threshold, review_share)
    context = calibration.best_slide_context([x.patient for x in validation], [x.x for x in validation],
                                             [x.y for x in validation], labels, p)
    patients = len({x.patient for x in validation})
    log.info("decision rule chosen on %d validation patients: threshold %.3f (balanced accuracy %.4f); review band "
             "%.3f (%.1f %% of patches, holding %s of the misses); slide context radius %d, weight %.1f, "
             "threshold %.3f (%.4f)", patients, threshold, balanced, review["review_band"],
             100 * review["share_flagged"], review["misses_held"], context["radius"], context["weight"],
             context["threshold"], context["validation_balanced_accuracy"])
    rule = {"threshold": threshold, "review_band": review["review_band"],
            "slide_context": context if context["weight"] > 0 else None,
            "threshold_source": f"validation: balanced accuracy {balanced:.4f} on {patients} patients"}
    return rule, {**review, "tradeoff": calibration.tradeoff(labels, p, review["review_band"])}


def _versions() -> dict:
    import tensorflow as tf

    return {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__}
