"""Training on one machine or on a cluster, with one training loop for both.

The strategy (`strategy()`, chosen once per process, before TensorFlow runs anything):
- a cluster of two or more workers (TF_CONFIG, or the Slurm/PBS variables: idc.training.cluster):
  MultiWorkerMirroredStrategy, data-parallel across the workers;
- several local GPUs: MirroredStrategy;
- otherwise TensorFlow's default strategy (one device).

The loop (`fit`) is the same under each: a custom training step, `strategy.run` over the Keras 3
model inside a tf.function, because Keras 3's Model.fit fails under MultiWorkerMirroredStrategy
("unsupported type ... PerReplica to a Tensor", keras-team/keras#20585). It keeps what Model.fit gave
the single-process training, through Keras's own callbacks: class weights (per-example weights, the
loss divided by the batch's size as Keras's "sum_over_batch_size"), L2 (the model's losses), early
stopping on the validation loss with the best weights restored, CSV history and TensorBoard logs of
loss and accuracy per epoch, the best checkpoint. Each global batch is the one a single process takes
(same seed, same order), split between the replicas, so a cluster trains the same model as one
machine, up to the order of float sums.

Resume: keras.callbacks.BackupAndRestore, driven by the loop. After each epoch the chief backs up the
weights, the optimizer's state, the epoch and early stopping's state under the model directory
(ModelDir.backup); at the start every worker restores that backup, so a killed job, rerun, goes on
from its last finished epoch, with its history so far. A finished phase leaves only its final weights
and history, so that a job killed in a later phase does not train it again (train.train removes them at
its end).

Only the chief writes (checkpoints, logs, history, backups); every worker takes the same steps.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from idc.core.cli import quiet_import

quiet_import("tensorflow")  # before Keras imports it: keeps TensorFlow's start-up noise out

import keras  # noqa: E402
import numpy as np
import tensorflow as tf  # importing is fine before strategy(); running an op is not

from idc.core.bundle import ModelDir
from idc.core.errors import ClusterError
from idc.core.files import replaced_atomically, write_text_atomically
from idc.training.cluster import cluster_config, is_chief

log = logging.getLogger(__name__)

# A collective that waits longer than this for a peer (dead, or never started) fails instead of hanging.
COLLECTIVE_TIMEOUT_SECONDS = 600
_chosen = None  # the process's strategy: MultiWorkerMirroredStrategy can be made once, at start-up


@dataclasses.dataclass(frozen=True)
class Worker:
    """This process's place in the training cluster."""

    rank: int  # 0..workers-1, the chief first: picks this worker's share of the bottleneck cache
    workers: int
    chief: bool  # the one that writes


def worker(env: Mapping[str, str] | None = None) -> Worker:
    """This process's place, from the cluster description (idc.training.cluster); Worker(0, 1, True)
    on a single machine."""
    cfg = cluster_config(os.environ if env is None else env)
    if not cfg:
        return Worker(0, 1, True)
    cluster, task = cfg["cluster"], cfg["task"]
    unsupported = sorted(set(cluster) - {"chief", "worker"}) + ([task["type"]] if task["type"] == "evaluator" else [])
    if unsupported:
        raise ClusterError(f"TF_CONFIG has {', '.join(unsupported)} tasks: training here uses only \"chief\" and "
                           "\"worker\" tasks (MultiWorkerMirroredStrategy)")
    order = [("chief", i) for i in range(len(cluster.get("chief", [])))] + \
            [("worker", i) for i in range(len(cluster.get("worker", [])))]
    return Worker(order.index((task["type"], task.get("index", 0))), len(order), is_chief(cfg))


def strategy():
    """The tf.distribute strategy of this process (see the module's docstring), made on first use.

    Call it before anything else runs TensorFlow ops (trainer.py does, through train()):
    MultiWorkerMirroredStrategy configures the runtime's collective ops, which TensorFlow allows only
    at start-up."""
    global _chosen
    if _chosen is None:
        _chosen = _choose(cluster_config(os.environ))
    return _chosen


def _choose(cfg: dict | None):
    if cfg:
        me = worker()
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(cfg["cluster"]), task_type=cfg["task"]["type"],
            task_id=cfg["task"].get("index", 0), rpc_layer="grpc")
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS)
        try:
            chosen = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver,
                                                               communication_options=options)
        except RuntimeError as err:
            if "program startup" not in str(err):
                raise
            raise ClusterError("MultiWorkerMirroredStrategy must be made before TensorFlow runs anything: call "
                               "idc.training.distributed.strategy() first in the process") from None
        log.info("training on a cluster: worker %d of %d%s, %d replicas (MultiWorkerMirroredStrategy)",
                 me.rank, me.workers, " (chief)" if me.chief else "", chosen.num_replicas_in_sync)
        return chosen
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        chosen = tf.distribute.MirroredStrategy()
        log.info("training on %d local GPUs (MirroredStrategy)", chosen.num_replicas_in_sync)
        return chosen
    return tf.distribute.get_strategy()


@dataclasses.dataclass
class Examples:
    """What `fit` trains or validates on: labels, and a reader of inputs by row (so that nothing needs to
    be in memory at once, and each worker reads only its replicas' rows). `read(rows, epoch)` returns
    the inputs of `rows` as one float32 array; `epoch` lets augmentation be a function of (row, epoch)."""

    labels: np.ndarray
    read: Callable[[np.ndarray, int], np.ndarray]

    def __len__(self) -> int:
        return len(self.labels)


def fit(model, train: Examples, validation: Examples | None, *, optimizer: Callable[[], object], epochs: int,
        batch_size: int, class_weight: dict[int, float] | None, seed: int, patience: int, model_dir: ModelDir,
        phase: str, run_id: str, full_batches: bool = False) -> tuple[dict[str, list[float]], int]:
    """Train `model` in place under this process's strategy; returns (the history of every epoch, those
    before a resume too, the epoch it started from: 0, or the epoch a backup of the same `run_id` resumed
    it at). A phase that already ended in an earlier run of the same `run_id` (a job killed in a later
    phase) is not trained again: its final weights are loaded (train.train removes them at its end).

    `optimizer()` makes the optimizer (inside the strategy's scope); `batch_size` is the global batch;
    `phase` names the logs, history, checkpoint and backup. `full_batches`: each epoch leaves out the rows
    of its last, partial batch (a different few each epoch), which would be padded with zeros: BatchNorm
    layers would take those into their batch statistics."""
    chosen, me = strategy(), worker()
    early = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True,
                                          verbose=int(me.chief)) if validation is not None else None
    backup = TrainingBackup(model_dir.backup(phase), run_id, me.chief, early)
    if backup.finished is not None:  # this phase ended in an earlier, killed run of the same job
        model.load_weights(backup.dir / FINISHED_WEIGHTS)
        log.info("%s: finished in an earlier run (%s): its weights are reused", phase, backup.dir)
        return backup.finished, len(next(iter(backup.finished.values()), []))

    trained = _replica_of(model, chosen)
    with chosen.scope():
        opt = optimizer()
        opt.build(trained.trainable_variables)
    trained.optimizer = opt  # BackupAndRestore saves and restores its state with the weights
    trained.stop_training = False  # EarlyStopping sets it
    writers = _chief_callbacks(model_dir, phase, validation is not None, backup.saved_epoch) if me.chief else []
    # Order matters: early stopping updates its state before the backup saves it, and the history row of an
    # epoch is written before its backup (a job killed in between redoes that epoch and rewrites its row).
    callbacks = keras.callbacks.CallbackList([c for c in (early, *writers, backup) if c is not None], model=trained)
    callbacks.on_train_begin()
    first = _agreed(chosen, backup.initial_epoch)
    checkpoint = next((c for c in writers if isinstance(c, keras.callbacks.ModelCheckpoint)), None)
    if first and early is not None and early.best is not None and checkpoint is not None:
        checkpoint.best = early.best  # the checkpoint on disk is that good: do not overwrite it with a worse one

    replicas = chosen.num_replicas_in_sync
    per_replica = -(-batch_size // replicas)
    train_step, eval_step = _steps(trained, opt, chosen)
    weights = np.ones(2, np.float32) if class_weight is None else \
        np.array([class_weight[0], class_weight[1]], np.float32)
    for epoch in range(first, epochs):
        started = time.time()
        callbacks.on_epoch_begin(epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(train))  # the same on every worker
        if full_batches and len(order) > batch_size:
            order = order[:len(order) - len(order) % batch_size]
        sums = np.zeros(3)
        for rows, inputs in _batches(chosen, train, order, batch_size, epoch, per_replica):
            inputs = _distribute(chosen, train, rows, epoch, per_replica, weights, trained.input_shape[1:], inputs)
            weighted_ce, weighted_correct, weight, regularization = train_step(
                *inputs, tf.constant(len(rows), tf.float32)).numpy()
            # Keras's epoch loss: the mean of the batch losses (weighted sum / rows, plus L2) over the rows
            sums += (weighted_ce + regularization * len(rows), weighted_correct, weight)
        logs = {"accuracy": sums[1] / sums[2], "loss": sums[0] / len(order)}
        if validation is not None:
            logs.update(_evaluate(chosen, eval_step, trained, validation, batch_size, per_replica, epoch))
        logs = {k: float(v) for k, v in logs.items()}
        callbacks.on_epoch_end(epoch, logs)  # the backup adds the epoch to its history
        if me.chief:
            print(f"Epoch {epoch + 1}/{epochs} - {time.time() - started:.1f}s - "
                  + " - ".join(f"{k}: {v:.4f}" for k, v in sorted(logs.items())), flush=True)
        if trained.stop_training:
            break
    callbacks.on_train_end()  # early stopping restores the best weights, then the backup marks the phase finished
    if trained is not model:
        copy_weights(trained, model)
    return backup.history, first


def _agreed(chosen, first_epoch: int) -> int:
    """The epoch every worker starts from: they must agree, or their steps would not match (one would wait
    for the others' gradients forever)."""
    if chosen.num_replicas_in_sync == 1:
        return first_epoch

    @tf.function
    def every_workers():
        return chosen.gather(chosen.run(lambda: tf.constant([first_epoch])), axis=0)

    starts = every_workers().numpy()
    low, high = int(starts.min()), int(starts.max())
    if low != high:
        raise ClusterError(f"the workers would resume at different epochs ({low + 1} to {high + 1}; this one at "
                           f"{first_epoch + 1}): do they all see the same backup folder, with the same settings?")
    return first_epoch


def _replica_of(model, chosen):
    """The model to train under `chosen`: itself under the default strategy, else a copy made in the
    strategy's scope (mirrored variables). Training a copy leaves `model` a plain Keras model, which the
    chief alone can save and run (a distributed one's predict would wait for the other workers)."""
    if chosen is tf.distribute.get_strategy():
        return model
    with chosen.scope():
        copy = keras.models.clone_model(model)
    copy_weights(model, copy)
    return copy


def copy_weights(source, target) -> None:
    target.set_weights(source.get_weights())
    # An adapted Normalization keeps its mean and variance as tensors derived from its weights: renew them.
    stack = list(target.layers)
    while stack:
        layer = stack.pop()
        stack += getattr(layer, "layers", [])
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()


def _steps(model, optimizer, chosen):
    """(train_step, eval_step) as tf.functions over the replicas; each returns the sums over the global
    batch of the weighted cross-entropy, weighted correct answers and weights (and, training, the L2)."""
    replicas = chosen.num_replicas_in_sync

    def answers(x, y, w, training):
        p = model(x, training=training)
        ce = keras.losses.sparse_categorical_crossentropy(y, p)
        correct = tf.cast(tf.equal(tf.argmax(p, axis=-1), y), tf.float32)
        regularization = tf.add_n(model.losses) if model.losses else tf.constant(0.0)
        return tf.reduce_sum(w * ce), tf.reduce_sum(w * correct), tf.reduce_sum(w), regularization

    @tf.function
    def train_step(x, y, w, batch_rows):
        def replica_step(x, y, w):
            with tf.GradientTape() as tape:
                weighted_ce, weighted_correct, weight, regularization = answers(x, y, w, True)
                # The batch's loss is divided by its rows over all replicas; the L2 term is shared among them,
                # and the optimizer sums the replicas' gradients.
                loss = weighted_ce / batch_rows + tf.nn.scale_regularization_loss(regularization)
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            return tf.stack([weighted_ce, weighted_correct, weight, regularization / replicas])

        return chosen.reduce(tf.distribute.ReduceOp.SUM, chosen.run(replica_step, args=(x, y, w)), axis=None)

    @tf.function
    def eval_step(x, y, w):
        def replica_step(x, y, w):
            return tf.stack(answers(x, y, w, False)[:3])

        return chosen.reduce(tf.distribute.ReduceOp.SUM, chosen.run(replica_step, args=(x, y, w)), axis=None)

    return train_step, eval_step


def _batches(chosen, examples: Examples, order: np.ndarray, batch_size: int, epoch: int, per_replica: int):
    """(rows, {replica: its inputs}) of each global batch in `order`, this worker's replicas only; the
    next batch is read (decoded, augmented) in a thread while the model trains on this one."""
    local = [int(r) for r in chosen.experimental_local_results(
        chosen.experimental_distribute_values_from_function(lambda context: context.replica_id_in_sync_group))]

    def read(rows):
        parts = {r: rows[r * per_replica:][:per_replica] for r in local}
        return {r: examples.read(mine, epoch) for r, mine in parts.items() if len(mine)}

    starts = range(0, len(order), batch_size)
    with ThreadPoolExecutor(1) as prefetch:
        pending = prefetch.submit(read, order[:batch_size])
        for start in starts:
            rows = order[start:start + batch_size]
            inputs = pending.result()
            if start + batch_size < len(order):
                pending = prefetch.submit(read, order[start + batch_size:start + 2 * batch_size])
            yield rows, inputs


def _distribute(chosen, examples: Examples, rows: np.ndarray, epoch: int, per_replica: int, class_weights: np.ndarray,
                input_shape: tuple, inputs: dict | None = None) -> tuple:
    """One global batch as per-replica (x, y, w): replica r takes rows[r * per_replica:][:per_replica],
    padded to per_replica rows of weight 0 (static shapes: one trace, and no replica is ever empty).
    Each worker reads only its own replicas' rows (or takes them from `inputs`, read ahead)."""
    def for_replica(context):
        replica = context.replica_id_in_sync_group
        mine = rows[replica * per_replica:][:per_replica]
        x = np.zeros((per_replica, *input_shape), np.float32)
        y = np.zeros(per_replica, np.int64)
        w = np.zeros(per_replica, np.float32)
        if len(mine):
            x[:len(mine)] = inputs[replica] if inputs is not None else examples.read(mine, epoch)
            y[:len(mine)] = examples.labels[mine]
            w[:len(mine)] = class_weights[examples.labels[mine]]
        return tf.constant(x), tf.constant(y), tf.constant(w)

    return chosen.experimental_distribute_values_from_function(for_replica)


def _evaluate(chosen, eval_step, model, examples: Examples, batch_size: int, per_replica: int,
              epoch: int) -> dict[str, float]:
    """val_loss (cross-entropy plus the L2 term, as Keras's evaluate) and val_accuracy, over all rows."""
    sums = np.zeros(3)
    ones = np.ones(2, np.float32)
    for start in range(0, len(examples), batch_size):
        rows = np.arange(start, min(start + batch_size, len(examples)))
        sums += eval_step(*_distribute(chosen, examples, rows, epoch, per_replica, ones, model.input_shape[1:])).numpy()
    regularization = float(sum(float(loss) for loss in model.losses))
    return {"val_accuracy": sums[1] / sums[2], "val_loss": sums[0] / sums[2] + regularization}


def _chief_callbacks(model_dir: ModelDir, phase: str, monitor_val: bool, resumed_at: int) -> list:
    """The chief's writers: TensorBoard, the CSV history (continued when resuming, from the resumed epoch)
    and the best checkpoint."""
    model_dir.checkpoint(phase).parent.mkdir(parents=True, exist_ok=True)
    history = model_dir.history(phase)
    if resumed_at and history.exists():
        with history.open(newline="") as f:
            rows = [row for row in csv.reader(f)]
        kept = rows[:1] + [row for row in rows[1:] if row and int(row[0]) < resumed_at]
        with history.open("w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(kept)
    elif history.exists():
        history.unlink()
    return [
        keras.callbacks.TensorBoard(log_dir=str(model_dir.log_dir(phase))),
        keras.callbacks.CSVLogger(str(history), append=bool(resumed_at)),
        keras.callbacks.ModelCheckpoint(str(model_dir.checkpoint(phase)), monitor="val_loss" if monitor_val else "loss",
                                        save_best_only=True),
    ]


FINISHED_WEIGHTS = "finished.weights.h5"
FINISHED_HISTORY = "finished_history.json"


class TrainingBackup(keras.callbacks.BackupAndRestore):
    """keras.callbacks.BackupAndRestore for a cluster and a custom loop.

    Every worker restores the chief's backup (so all resume at the same epoch and take the same steps);
    only the chief saves. Early stopping's state (patience spent, best loss and weights) is saved with
    it. A backup made by another run (other settings or data: another `run_id`) is not used."""

    def __init__(self, backup_dir: Path, run_id: str, chief: bool, early_stopping=None):
        super().__init__(str(backup_dir), double_checkpoint=True, delete_checkpoint=chief)
        self.dir, self.run_id, self.chief, self.early_stopping = Path(backup_dir), run_id, chief, early_stopping
        self.initial_epoch = 0
        self.history: dict[str, list[float]] = {}  # every epoch's logs, those of a resumed run's too
        run_file, metadata = self.dir / "run.json", self.dir / "training_metadata.json"
        same_run = run_file.exists() and json.loads(run_file.read_text()).get("run") == run_id
        self.saved_epoch = json.loads(metadata.read_text())["epoch"] if same_run and metadata.exists() else 0
        # A phase that ended leaves its final weights and history (the job may be killed in a later phase):
        # None, or the history of the finished phase.
        finished = self.dir / FINISHED_HISTORY
        self.finished = json.loads(finished.read_text()) if same_run and finished.exists() else None
        if not same_run and self.dir.exists() and chief:
            log.warning("%s holds the backup of another training run (other settings or data): not resumed, removed",
                        self.dir)
            shutil.rmtree(self.dir, ignore_errors=True)

    def on_epoch_end(self, epoch, logs=None):
        for name, value in (logs or {}).items():
            self.history.setdefault(name, []).append(float(value))
        super().on_epoch_end(epoch, logs)  # the backup, with the history so far

    def on_train_end(self, logs=None):
        super().on_train_end(logs)  # removes the backup (the chief)
        if self.chief:  # ...and leaves the phase's end, for a rerun after a kill in a later phase
            self.dir.mkdir(parents=True, exist_ok=True)
            self.model.save_weights(self.dir / FINISHED_WEIGHTS)
            write_text_atomically(self.dir / FINISHED_HISTORY, json.dumps(self.history))
            write_text_atomically(self.dir / "run.json", json.dumps({"run": self.run_id}))

    def on_train_begin(self, logs=None):
        if not self.saved_epoch:
            return
        super().on_train_begin(logs)  # weights and optimizer state; sets the model's _initial_epoch, as fit reads it
        self.initial_epoch = int(self.model._initial_epoch or 0)
        self.model._initial_epoch = None
        state_file = self._early_stopping_file(self.initial_epoch)
        if self.early_stopping is not None and state_file.exists():
            with np.load(state_file) as state:
                stopper = self.early_stopping
                stopper.wait, stopper.best_epoch = int(state["wait"]), int(state["best_epoch"])
                stopper.best = float(state["best"])
                stopper.best_weights = [state[f"w{i}"] for i in range(len(state.files) - 3)]
        history_file = self._history_file(self.initial_epoch)
        self.history = json.loads(history_file.read_text()) if history_file.exists() else {}
        log.info("resuming from the backup in %s at epoch %d", self.dir, self.initial_epoch + 1)

    def _save_model(self):
        if not self.chief:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.dir / "run.json", json.dumps({"run": self.run_id}))
        stopper = self.early_stopping
        if stopper is not None and stopper.best_weights is not None:
            # One file per epoch, kept until a later backup is complete: whichever epoch the weights are
            # restored at (the latest, or the one before when the latest file is damaged), its state is there.
            with replaced_atomically(self._early_stopping_file(self._current_epoch)) as tmp, open(tmp, "wb") as f:
                np.savez(f, wait=stopper.wait, best=stopper.best, best_epoch=stopper.best_epoch,
                         **{f"w{i}": w for i, w in enumerate(stopper.best_weights)})
        write_text_atomically(self._history_file(self._current_epoch), json.dumps(self.history))
        super()._save_model()  # the weights, then training_metadata.json with the epoch: written last
        for pattern in ("early_stopping.*.npz", "history.*.json"):
            for old in self.dir.glob(pattern):
                if int(old.name.split(".")[1]) < self._current_epoch - 1:
                    old.unlink(missing_ok=True)

    def _early_stopping_file(self, epoch: int) -> Path:
        return self.dir / f"early_stopping.{epoch}.npz"

    def _history_file(self, epoch: int) -> Path:
        return self.dir / f"history.{epoch}.json"
