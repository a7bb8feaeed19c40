"""The sharded bottleneck cache: each image once, never recomputed, atomic shards, streamed reads,
two workers' shares and the wait for them. Real files, the tiny stand-in trunk."""

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from idc.core.errors import ClusterWaitError
from idc.training import bottleneck
from idc.training.bottleneck import BottleneckCache, CachedFeatures, file_digest, read_shard, shard_of, shard_owner
from tests.paths import ROOT
from tests.synthetic import patch_image, tiny_trunk

SIZE = 75


@pytest.fixture(scope="module")
def trunk():
    return tiny_trunk(SIZE)


def images(folder, count, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(folder / f"{seed}-{i}.png")
        patch_image(i % 2, np.random.default_rng([seed, i])).save(paths[-1])
    return paths


def stored(cache: BottleneckCache) -> list[str]:
    """Every entry of every shard (repeats would show)."""
    return [d.decode() for path in sorted(cache.folder.glob("shard-*.npy")) for d in read_shard(path)[0]]


def test_each_image_is_stored_once_and_never_recomputed(tmp_path, trunk):
    paths = images(tmp_path / "images", 30)
    copy = tmp_path / "images" / "copy.png"
    copy.write_bytes(paths[3].read_bytes())  # the same image twice: computed and stored once
    cache = BottleneckCache(tmp_path / "cache", "key")
    first = cache.features(paths + [copy], trunk, 8, SIZE)
    assert (cache.misses, cache.hits) == (30, 1) and len(cache) == 30
    np.testing.assert_array_equal(first[3], first[-1])
    assert sorted(stored(cache)) == sorted({file_digest(p) for p in paths})
    assert all(path.name == f"shard-{shard_of(read_shard(path)[0][0].decode())}.npy"
               for path in cache.folder.glob("shard-*.npy"))

    again = BottleneckCache(tmp_path / "cache", "key")
    np.testing.assert_array_equal(again.features(paths + [copy], trunk, 8, SIZE), first)
    assert (again.misses, again.hits) == (0, 31)
    before = again.lookup([file_digest(p) for p in paths])
    more = images(tmp_path / "images", 40, seed=1)
    again.features(paths + more, trunk, 8, SIZE)
    assert again.misses == 40 and len(again) == 70 and len(stored(again)) == len(set(stored(again))) == 70
    # Shards only grow: rows found before the new entries came still hold the same features.
    after = again.lookup([file_digest(p) for p in paths])
    np.testing.assert_array_equal(after.row, before.row)
    np.testing.assert_array_equal(before.read(np.arange(30)), first[:30])


def test_a_changed_image_view_or_size_misses(tmp_path, trunk):
    paths = images(tmp_path / "images", 6)
    key = bottleneck.trunk_key("custom:tiny", ["mixed1"], "mean", SIZE)
    cache = BottleneckCache(tmp_path / "cache", key)
    identity = cache.features(paths, trunk, 4, SIZE)
    patch_image(1, np.random.default_rng(99)).save(paths[0])  # the image changed on disk
    cache.features(paths, trunk, 4, SIZE)
    assert (cache.hits, cache.misses) == (5, 1)
    # Another view or input size is another key, so another folder: every image misses.
    flipped_key = bottleneck.trunk_key("custom:tiny", ["mixed1"], "mean", SIZE, "hflip")
    flipped = BottleneckCache(tmp_path / "cache", flipped_key, view="hflip")
    hflip = flipped.features(paths, trunk, 4, SIZE)
    assert flipped.misses == 6 and not np.allclose(hflip[1:], identity[1:])
    resized = BottleneckCache(tmp_path / "cache", bottleneck.trunk_key("custom:tiny", ["mixed1"], "mean", 80))
    resized.features(paths, tiny_trunk(80), 4, 80)
    assert resized.misses == 6 and len({key, flipped_key, resized.folder.name}) == 3


def test_reads_are_memory_mapped_and_streamed(tmp_path, trunk):
    paths = images(tmp_path / "images", 40)
    cache = BottleneckCache(tmp_path / "cache", "key")
    everything = cache.features(paths, trunk, 16, SIZE)
    shard = next(cache.folder.glob("shard-*.npy"))
    digests, features = read_shard(shard)
    assert isinstance(digests, np.memmap) and isinstance(features, np.memmap)
    assert features.dtype == np.float32 and features.shape == (len(digests), everything.shape[1])

    rows = cache.lookup([file_digest(p) for p in paths])
    assert isinstance(rows, CachedFeatures) and rows.shape == everything.shape
    picked = np.array([39, 0, 7, 7, 21])  # any order, repeats allowed
    np.testing.assert_array_equal(rows.read(picked), everything[picked])
    np.testing.assert_array_equal(np.concatenate(list(rows.chunks(size=6))), everything)
    # Views one after the other, as training reads them.
    both = CachedFeatures.concat([rows, rows])
    np.testing.assert_array_equal(both.read(np.array([0, 40, 79])), everything[[0, 0, 39]])
    # The memory map holds the same features.
    position = [file_digest(p) for p in paths].index(digests[0].decode())
    np.testing.assert_array_equal(features[0], everything[position])

WRITER = """
import sys
import numpy as np
from pathlib import Path
from idc.training.bottleneck import write_shard
path = Path(sys.argv[1])
for n in range(1, 10_000):  # ever larger versions of one shard, until killed
    rows = 20_000 * n
    digests = np.array([b"%040d" % i for i in range(rows)])
    write_shard(path, digests, np.repeat(np.arange(rows, dtype=np.float32)[:, None], 64, axis=1))
    print(rows, flush=True)
"""


def test_a_shard_is_whole_or_absent_even_when_its_writer_is_killed(tmp_path):
    path = tmp_path / "shard-00.npy"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={"TF_CPP_MIN_LOG_LEVEL": "2", "PATH": ""})
    try:
        assert writer.stdout.readline().strip() == "20000"  # one version written, the next one in progress
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob(".shard-00.npy.*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.001)
        writer.kill()  # mid-write: SIGKILL, no clean-up
    finally:
        writer.kill()
        writer.wait()
    digests, features = read_shard(path)
    assert len(digests) % 20_000 == 0 and features.shape == (len(digests), 64)
    np.testing.assert_array_equal(features[:, 0], np.arange(len(digests)))  # whole: every row written
    cache = BottleneckCache(tmp_path.parent, tmp_path.name)
    assert len(cache) == len(digests)  # a leftover temporary file is not a shard


def test_readers_never_see_half_a_shard(tmp_path):
    """One thread rewrites a shard, ever larger, while others read it: each read is a whole version."""
    path = tmp_path / "shard-ab.npy"
    bottleneck.write_shard(path, np.array([b"ab" + b"0" * 38]), np.zeros((1, 256), np.float32))
    stop = threading.Event()
    seen, problems = set(), []

    def write():
        for n in range(2, 200):
            digests = np.array([b"ab%038d" % i for i in range(n * 50)])
            bottleneck.write_shard(path, digests, np.repeat(np.arange(n * 50, dtype=np.float32)[:, None], 256, 1))
        stop.set()

    def read():
        while not stop.is_set():
            digests, features = read_shard(path)
            seen.add(len(digests))
            if features.shape[0] != len(digests) or (len(digests) > 1 and features[-1, -1] != len(digests) - 1):
                problems.append(len(digests))

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not problems and len(seen) > 5


def test_two_jobs_adding_to_one_shard_lose_nothing(tmp_path):
    """Two trainings sharing a cache (not a cluster: either may write any shard) add to one shard at once."""
    caches = [BottleneckCache(tmp_path, "key") for _ in range(2)]
    caches[0].folder.mkdir()

    def add(job: int):
        for i in range(40):
            caches[job]._append("ab", [(f"ab{job}{i:037d}", np.full(512, i, np.float32))])

    threads = [threading.Thread(target=add, args=(job,)) for job in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(stored(caches[0])) == len(set(stored(caches[0]))) == 80


def test_two_workers_share_the_work_and_wait_for_each_other(tmp_path, trunk):
    paths = images(tmp_path / "images", 40)
    digests = [file_digest(p) for p in paths]
    first = BottleneckCache(tmp_path / "cache", "key", worker=0, workers=2)
    first.compute(paths, trunk, 8, SIZE)
    mine = sum(shard_owner(shard_of(d), 2) == 0 for d in digests)
    assert (first.misses, first.from_other_workers) == (mine, 40 - mine) and 0 < mine < 40
    with pytest.raises(ClusterWaitError, match=r"share of worker\(s\) 1 of 2"):
        first.wait_for(digests, stall_seconds=0.5)  # bounded: the other worker has not started

    waited = []
    waiter = threading.Thread(target=lambda: waited.append(first.wait_for(digests, stall_seconds=60) or "done"))
    waiter.start()
    second = BottleneckCache(tmp_path / "cache", "key", worker=1, workers=2)
    second.compute(paths, trunk, 8, SIZE)
    waiter.join(timeout=60)
    assert waited == ["done"] and second.misses == 40 - mine
    assert sorted(stored(first)) == sorted(digests)  # each image once, in the whole cluster
    alone = BottleneckCache(tmp_path / "alone", "key").features(paths, trunk, 8, SIZE)
    # the same features, up to float rounding: each worker's batches hold other images than the lone
    # run's, and a convolution's kernel may sum in another order for another batch (seen once: 7e-9)
    np.testing.assert_allclose(first.lookup(digests).read(np.arange(40)), alone, rtol=1e-6, atol=1e-7)


def test_a_cache_of_the_one_file_format_is_converted_not_recomputed(tmp_path, trunk):
    paths = images(tmp_path / "images", 10)
    features = BottleneckCache(tmp_path / "new", "key").features(paths, trunk, 4, SIZE)
    legacy = tmp_path / "old" / "key" / bottleneck.LEGACY_FILE
    legacy.parent.mkdir(parents=True)
    np.savez(legacy, digests=np.array([file_digest(p) for p in paths]), features=features)
    cache = BottleneckCache(tmp_path / "old", "key")
    np.testing.assert_array_equal(cache.features(paths, trunk, 4, SIZE), features)
    assert cache.misses == 0 and not legacy.exists() and len(cache) == 10
