"""Training on a cluster, for real: two workers as two processes on 127.0.0.1 (each with its own
TF_CONFIG, at free ports: MultiWorkerMirroredStrategy on CPU, no mocks), on a synthetic dataset with
the tiny stand-in trunk (tests/cluster_worker.py, run as `python -m tests.cluster_worker`, runs one worker as trainer.py would)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from idc.core.config import load_config
from idc.core.errors import ClusterError
from idc.keras_model import load_keras_model
from idc.training import augment, bottleneck, data, distributed
from idc.training.train import train
from tests.paths import ROOT
from tests.synthetic import make_dataset, tiny_trunk, write_config

WORKER = "tests.cluster_worker"  # python -m, from ROOT
RUN_SECONDS = 240  # a whole two-worker training (start-up, bottlenecks, head, fine-tuning) takes ~25 s here
# The cluster adds each global batch's gradient in two halves: float sums in another order, nothing more
# (measured: the head's weights within 1e-7 of a single process's). In the patch CNN, Adam turns those
# roundings into weight differences of up to ~1e-5 (measured); P(IDC) stays within 1e-5 (the goal: 1e-4;
# Keras's own BatchNorm and Dropout, per replica, gave 7.4e-3 here and 0.04 on real patients; Keras's
# synchronized BatchNorm, float32 sums, 5e-4).
TOLERANCE = 1e-5
P_TOLERANCE = WEIGHT_TOLERANCE = 1e-4
# What a cluster shares (a shared file system): the sorted data, the bottleneck cache, the backups.
SHARED = ("manifest.csv", "train", "validation", "bottlenecks", "backups")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cluster-data") / "raw", patients=6, per_class=6)


def sorted_project(folder, raw, **settings):
    """A model directory with the synthetic patches sorted (2 of 6 patients for validation)."""
    folder.mkdir(parents=True)
    config = load_config(write_config(folder, dataset_dir=str(raw), **settings))
    data.sort_dataset(raw, config.model, validation_fraction=0.34, test_fraction=0.0, seed=0)
    return config


def two_worker_project(tmp, raw, **settings):
    """(chief's config, other worker's config). The chief has the model directory; the other worker's
    holds links to what a cluster shares and nothing else, so anything it wrote elsewhere shows."""
    chief = sorted_project(tmp / "chief", raw, **settings)
    for name in ("bottlenecks", "backups"):
        (chief.model_dir / name).mkdir()
    (tmp / "other").mkdir()
    other = load_config(write_config(tmp / "other", dataset_dir=str(raw), **settings))
    other.model_dir.mkdir()
    for name in SHARED:
        (other.model_dir / name).symlink_to(chief.model_dir / name)
    return chief, other


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(configs) -> list[subprocess.Popen]:
    addresses = [f"127.0.0.1:{port}" for port in free_ports(len(configs))]
    workers = []
    for index, config in enumerate(configs):
        tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "2",
               "CUDA_VISIBLE_DEVICES": ""}
        workers.append(subprocess.Popen([sys.executable, "-m", WORKER, str(config.path)], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return workers


def finish(workers, timeout: float = RUN_SECONDS) -> list[dict]:
    """Each worker's training record; fails with their output if one fails or they outlast `timeout`."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
        pytest.fail(f"the workers did not finish in {timeout} s:\n"
                    + "\n".join(worker.communicate()[1][-3000:] for worker in workers))
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, f"worker failed ({worker.returncode}):\n{err[-5000:]}"
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def predictions(model_dir, name="DevCloudIDC"):
    model = load_keras_model(model_dir / f"{name}.keras")
    batch = np.random.default_rng(0).uniform(-1, 1, (8, 75, 75, 3)).astype(np.float32)
    return np.asarray(model(batch)), model.get_weights()


def test_two_workers_train_the_model_one_worker_trains(raw, tmp_path):
    # The default model: the head and the patch CNN (its BatchNorm and dropout), and fine-tuning too.
    settings = dict(epochs=12, early_stopping_patience=12, fine_tune_blocks=1, fine_tune_epochs=1, patch_cnn_epochs=3)
    chief, other = two_worker_project(tmp_path / "cluster", raw, **settings)
    records = finish(start_workers([chief, other]))

    single = sorted_project(tmp_path / "single", raw, **settings)
    alone = train(single, trunk=tiny_trunk())
    # The same model, up to the order of float sums: head, fine-tuned trunk and patch CNN alike.
    (p_cluster, w_cluster), (p_single, w_single) = predictions(chief.model_dir), predictions(single.model_dir)
    np.testing.assert_allclose(p_cluster, p_single, atol=P_TOLERANCE)
    for a, b in zip(w_cluster, w_single):
        np.testing.assert_allclose(a, b, atol=WEIGHT_TOLERANCE)
    assert len(records[0]["patch_cnn_history"]["loss"]) == 3 == len(alone["patch_cnn_history"]["loss"])
    assert [r["cluster"]["workers"] for r in records] == [2, 2] and records[0]["cluster"]["replicas"] == 2
    assert records[0]["head_history"]["loss"] == pytest.approx(alone["head_history"]["loss"], abs=1e-4)
    assert records[0]["head_history"] == records[1]["head_history"]  # both took the same steps

    # Only the chief wrote: the bundle, model, record, history, logs are in its folder; the other
    # worker's folder holds its links and nothing else.
    for name in ("model.json", "DevCloudIDC.keras", "training.json", "classes.txt", "history_head.csv",
                 "history_fine_tune.csv", "logs", "checkpoints"):
        assert (chief.model_dir / name).exists(), name
    assert sorted(p.name for p in other.model_dir.iterdir()) == sorted(SHARED)
    assert all((other.model_dir / name).is_symlink() for name in SHARED)
    assert records[1]["decision_rule"] is None and records[0]["decision_rule"]["threshold"] == 0.54
    assert not any(chief.model_dir.joinpath("backups").iterdir())  # finished phases leave no backup

    # The cache holds each image once, for each view; each was computed by one worker, both did a share.
    train_images, validation_images = 4 * 12, 2 * 12
    per_view = {}
    for folder in (chief.model_dir / "bottlenecks").iterdir():
        digests = [d for shard in folder.glob("shard-*.npy") for d in bottleneck.read_shard(shard)[0]]
        assert len(digests) == len(set(digests))
        per_view[json.loads((folder / "trunk.json").read_text())["view"]] = len(digests)
    jpeg = augment.describe_view("jpeg1", None, chief.classifier.random_seed)  # a drawn view's cache key
    assert per_view == {"identity": train_images + validation_images, "hflip": train_images,
                        "vflip": train_images, "rot90": train_images, jpeg: train_images}
    computed = [r["bottleneck_cache"]["train"]["computed"] + r["bottleneck_cache"]["validation"]["computed"]
                for r in records]
    assert sum(computed) == sum(per_view.values()) and min(computed) > 0


def kill_after_backup(workers, metadata, epochs: int) -> None:
    """SIGKILL the job (as a scheduler kills it: no clean-up of any kind) once its backup (`metadata`,
    a phase's training_metadata.json) holds `epochs` epochs."""
    deadline = time.monotonic() + RUN_SECONDS
    backed_up = 0
    while backed_up < epochs and time.monotonic() < deadline and all(w.poll() is None for w in workers):
        try:
            backed_up = json.loads(metadata.read_text())["epoch"]
        except (OSError, ValueError, KeyError):  # not there yet
            pass
        time.sleep(0.02)
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
    errors = [worker.communicate()[1] for worker in workers]
    assert backed_up >= epochs, (f"the job ended before {metadata.parent.name} backed up {epochs} epochs:\n"
                                 + "\n".join(e[-3000:] for e in errors))


def test_a_killed_job_resumes_from_its_last_epoch(raw, tmp_path):
    settings = dict(epochs=40, early_stopping_patience=40)
    chief, other = two_worker_project(tmp_path / "cluster", raw, **settings)
    metadata = chief.model.backup("head") / "training_metadata.json"
    kill_after_backup(start_workers([chief, other]), metadata, 3)

    resumed = finish(start_workers([chief, other]))[0]
    start = resumed["resumed_from_epoch"]
    assert start >= 3, resumed  # from the backup, not from epoch 0
    assert resumed["epochs_run"] == 40 and len(resumed["head_history"]["loss"]) == 40  # the killed run's epochs too
    assert resumed["bottleneck_cache"]["train"]["computed"] == 0  # the killed job's cache is kept
    with chief.model.history("head").open() as f:
        epochs = [int(line.split(",")[0]) for line in f.readlines()[1:]]
    assert epochs == list(range(40))  # every epoch once: the killed run's, then the resumed run's
    assert not chief.model.backup("head").exists()

    # The resumed model is the model an uninterrupted run trains: weights, optimizer state, epoch and
    # early stopping's state all came back.
    single = sorted_project(tmp_path / "single", raw, **settings)
    train(single, trunk=tiny_trunk())
    np.testing.assert_allclose(predictions(chief.model_dir)[0], predictions(single.model_dir)[0], atol=TOLERANCE)


def test_a_job_killed_in_the_patch_cnn_phase_resumes_there_without_training_the_head_again(raw, tmp_path):
    settings = dict(epochs=12, early_stopping_patience=12, patch_cnn_epochs=6)
    chief, other = two_worker_project(tmp_path / "cluster", raw, **settings)
    metadata = chief.model.backup("patch_cnn") / "training_metadata.json"
    kill_after_backup(start_workers([chief, other]), metadata, 2)

    resumed = finish(start_workers([chief, other]))[0]
    assert resumed["resumed_from_epoch"] == 12  # the head's final weights, from the killed run: not trained again
    assert len(resumed["head_history"]["loss"]) == 12 and len(resumed["patch_cnn_history"]["loss"]) == 6
    assert not any(chief.model_dir.joinpath("backups").iterdir())
    single = sorted_project(tmp_path / "single", raw, **settings)
    alone = train(single, trunk=tiny_trunk())
    assert resumed["patch_cnn_history"]["loss"] == pytest.approx(alone["patch_cnn_history"]["loss"], abs=1e-4)
    np.testing.assert_allclose(predictions(chief.model_dir)[0], predictions(single.model_dir)[0], atol=P_TOLERANCE)


def test_worker_places_from_the_cluster_description():
    def place(cluster, kind, index):
        return distributed.worker({"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})})

    workers = ["a:1", "b:1", "c:1"]
    assert distributed.worker({}) == distributed.Worker(0, 1, True)
    assert place({"worker": workers}, "worker", 0) == distributed.Worker(0, 3, True)
    assert place({"worker": workers}, "worker", 2) == distributed.Worker(2, 3, False)
    assert place({"chief": ["z:1"], "worker": workers}, "chief", 0) == distributed.Worker(0, 4, True)
    assert place({"chief": ["z:1"], "worker": workers}, "worker", 0) == distributed.Worker(1, 4, False)
    with pytest.raises(ClusterError, match="ps tasks"):
        place({"worker": workers, "ps": ["p:1"]}, "worker", 0)


def test_a_single_machine_trains_under_the_default_strategy():
    import tensorflow as tf

    assert distributed.strategy() is tf.distribute.get_strategy()


def test_a_cluster_strategy_made_after_tensorflow_started_says_what_to_do():
    script = ("import tensorflow as tf; tf.constant(1)\n"
              "from idc.training import distributed\n"
              "try:\n    distributed.strategy()\nexcept Exception as err:\n    print(type(err).__name__, err)\n")
    tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}, "task": {"type": "worker", "index": 0}}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert "ClusterError" in done.stdout and "distributed.strategy() first" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("full_batches", [False, True])
def test_full_batches_leave_out_each_epochs_partial_batch(tmp_path, full_batches):
    """With full_batches (the patch CNN's BatchNorm), every training batch has batch_size rows: the few
    rows of the partial last batch are left out, other ones each epoch; without it, every row is read."""
    import keras

    from idc.core.bundle import ModelDir

    read = []

    def reader(rows, epoch):
        read.append((epoch, [int(r) for r in rows]))
        return np.zeros((len(rows), 4), np.float32)

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    labels = np.array([0, 1] * 5)
    distributed.fit(model, distributed.Examples(labels, reader), None, optimizer=lambda: keras.optimizers.SGD(0.1),
                    epochs=2, batch_size=4, class_weight=None, seed=0, patience=1,
                    model_dir=ModelDir(tmp_path, "m"), phase="probe", run_id="probe", full_batches=full_batches)
    for epoch in (0, 1):
        batches = [rows for e, rows in read if e == epoch]
        assert [len(rows) for rows in batches] == ([4, 4] if full_batches else [4, 4, 2])
        seen = sorted(r for rows in batches for r in rows)
        assert seen == sorted(set(seen)) and (len(seen) == 8 if full_batches else seen == list(range(10)))
    if full_batches:  # a different few rows left out in each epoch
        assert {r for e, rows in read if e == 0 for r in rows} != {r for e, rows in read if e == 1 for r in rows}
