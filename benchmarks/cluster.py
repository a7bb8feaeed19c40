#!/usr/bin/env python3
r"""Training on a cluster, measured on this machine: bottleneck extraction shared by local worker
processes, projected to the full dataset; and head training streamed from a cache of the full
dataset's size, with its peak memory.

Extraction: --images real patches, one view, by 1 worker and then by --workers worker processes
sharing one fresh cache folder, each computing its share (by content hash) and waiting for the
others', as the workers of a cluster do. The per-image cost of one worker is projected to the full
dataset (277,524 patches x --views views) on 1, 4 and 16 workers, each worker a machine of its
own. On a machine with few cores the local workers share the same cores: they show that the work
is split, not how it scales.

Streamed training: a cache of --patches patches x --views views of synthetic features of the
default trunk's width (1,088: mean and std of mixed0 and mixed1), stored as training stores them
(float32 shards), then the head trained on it for --epochs epochs in a child process, the training
views of 85 % of the patches against the identity view of the rest. Reported: the cache's size,
the time per epoch, and the child's peak resident memory (ru_maxrss), which must stay far below
the cache's size: features are read in batches, never all held in memory.

  python benchmarks/cluster.py --data ../shared/data/idc-patches \
      --weights ../shared/weights/inception_v3_notop.weights.h5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FULL_DATASET = 277_524  # patches of the public dataset
IDC_SHARE = 78_786 / FULL_DATASET  # its share of IDC patches
FEATURE_WIDTH = 2 * (256 + 288)  # mean and std of mixed0 (256 channels) and mixed1 (288)
VIEWS = ("identity", "hflip", "vflip", "rot90")


def extract_share(rank: int, workers: int, paths: list[str], cache_dir: str, settings: dict, results) -> None:
    """One extraction worker (a child process): its share of the cache, then the wait for the others'."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from idc.training import bottleneck
    from idc.training.model import build_trunk, describe_weights

    started = time.perf_counter()
    trunk = build_trunk(settings["weights"], settings["image_size"], settings["feature_layers"], settings["pooling"])
    key = bottleneck.trunk_key(describe_weights(settings["weights"]), settings["feature_layers"], settings["pooling"],
                               settings["image_size"])
    cache = bottleneck.BottleneckCache(cache_dir, key, worker=rank, workers=workers)
    ready = time.perf_counter()
    digests = cache.compute([Path(p) for p in paths], trunk, settings["batch_size"], settings["image_size"])
    computed = time.perf_counter()
    cache.wait_for(digests, stall_seconds=600)
    results.put({"rank": rank, "startup_s": ready - started, "compute_s": computed - ready,
                 "wait_s": time.perf_counter() - computed, "computed": cache.misses})


def run_extraction(workers: int, paths: list[Path], cache_dir: Path, settings: dict) -> dict:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    started = time.perf_counter()
    children = [context.Process(target=extract_share, args=(rank, workers, [str(p) for p in paths], str(cache_dir),
                                                            settings, results)) for rank in range(workers)]
    for child in children:
        child.start()
    shares = [results.get(timeout=3600) for _ in children]
    for child in children:
        child.join()
        if child.exitcode:
            sys.exit(f"an extraction worker failed (exit status {child.exitcode})")
    return {"workers": workers, "wall_s": time.perf_counter() - started, "shares": sorted(shares, key=lambda s: s["rank"])}


def extraction(args, settings: dict, work: Path) -> None:
    from idc.core.files import find_images

    everything = find_images([args.data])
    if len(everything) < args.images:
        sys.exit(f"--data {args.data} holds {len(everything)} images, fewer than --images {args.images}")
    step = len(everything) / args.images  # spread over the patients, not the first few
    paths = [everything[int(i * step)] for i in range(args.images)]
    print(f"\n== Bottleneck extraction: {args.images} real patches, one view, {settings['image_size']} px, "
          f"{'+'.join(settings['feature_layers'])} {settings['pooling']} ({os.cpu_count()} cores here)")
    runs = [run_extraction(n, paths, work / f"cache-{n}-workers", settings) for n in sorted({1, args.workers})]
    for run in runs:
        counts = [s["computed"] for s in run["shares"]]
        compute = max(s["compute_s"] for s in run["shares"])
        print(f"{run['workers']} worker(s): wall {run['wall_s']:.1f} s (start-up {max(s['startup_s'] for s in run['shares']):.1f} s, "
              f"computing {compute:.1f} s, waiting for the others {max(s['wait_s'] for s in run['shares']):.1f} s); "
              f"images computed per worker {counts} (each once: {sum(counts)} of {args.images})")
    one = runs[0]["shares"][0]
    per_image = one["compute_s"] / one["computed"]
    if len(runs) > 1:
        print(f"speed-up of {args.workers} local workers over 1 (computing): "
              f"{one['compute_s'] / max(s['compute_s'] for s in runs[1]['shares']):.2f}x "
              f"(a {os.cpu_count()}-core machine: the workers share its cores, so this cannot show real scaling)")
    full = FULL_DATASET * args.views
    print(f"per image, one worker: {1000 * per_image:.1f} ms; the full dataset, {FULL_DATASET:,} patches x "
          f"{args.views} views = {full:,} images, on workers like this one (each with its own machine):")
    for n in (1, 4, 16):
        hours = per_image * full / n / 3600
        print(f"  {n:>2} worker(s): {hours:7.1f} h ({hours * 60:,.0f} min)")
    print("  (a cached image is never recomputed: a second run, or more data, costs only the new images)")


def synthetic_digests(count: int) -> list[str]:
    return [hashlib.sha1(f"patch {i}".encode()).hexdigest() for i in range(count)]


def write_synthetic_cache(cache_dir: Path, patches: int, views: int, seed: int) -> tuple:
    """Shards of synthetic features: class-dependent means plus noise, so that there is something to learn."""
    import numpy as np

    from idc.training import bottleneck

    rng = np.random.default_rng(seed)
    digests = synthetic_digests(patches)
    labels = (rng.random(patches) < IDC_SHARE).astype(np.int64)
    shift = rng.normal(0, 0.05, FEATURE_WIDTH).astype(np.float32)  # weak evidence in every feature
    shards = np.array([bottleneck.shard_of(d) for d in digests])
    for view in VIEWS[:views]:
        folder = cache_dir / f"synthetic-{view}"
        folder.mkdir(parents=True, exist_ok=True)
        for shard in sorted(set(shards)):
            rows = np.flatnonzero(shards == shard)
            features = rng.standard_normal((len(rows), FEATURE_WIDTH), dtype=np.float32)
            features += labels[rows, None] * shift
            bottleneck.write_shard(folder / f"shard-{shard}.npy", np.array([digests[i] for i in rows], dtype="S40"),
                                   features)
    return digests, labels


def train_streamed(config_path: str, cache_dir: str, patches: int, views: int, labels, results) -> None:
    """The head trained from the synthetic cache (a child process: its peak memory is its own)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from idc.core.config import load_config
    from idc.training import bottleneck
    from idc.training.train import train_head

    config = load_config(config_path)
    digests = synthetic_digests(patches)
    train_count = int(0.85 * patches)
    started = time.perf_counter()
    parts = [bottleneck.BottleneckCache(cache_dir, f"synthetic-{view}").lookup(digests[:train_count])
             for view in VIEWS[:views]]
    train_x = bottleneck.CachedFeatures.concat(parts)
    val_x = bottleneck.BottleneckCache(cache_dir, "synthetic-identity").lookup(digests[train_count:])
    indexed = time.perf_counter()
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    head, history, _ = train_head(config, train_x, np.tile(labels[:train_count], views), val_x, labels[train_count:])
    results.put({"index_s": indexed - started, "train_s": time.perf_counter() - indexed,
                 "rows": len(train_x), "val_rows": len(val_x), "history": history,
                 "rss_before_kib": baseline_kib, "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})


def streamed_training(args, work: Path) -> None:
    from idc.core.bundle import MANIFEST_FIELDS

    needed = args.patches * args.views * (FEATURE_WIDTH * 4 + 40)
    free = shutil.disk_usage(work).free
    print(f"\n== Streamed head training: {args.patches:,} patches x {args.views} views x {FEATURE_WIDTH} features "
          f"(float32: {needed / 1e9:.2f} GB on disk; {free / 1e9:.0f} GB free in {work})")
    if free < 1.2 * needed:
        sys.exit(f"not enough disk space in {work} for the synthetic cache: use --work-dir elsewhere, or fewer --patches")
    cache_dir = work / "bottlenecks"
    started = time.perf_counter()
    _, labels = write_synthetic_cache(cache_dir, args.patches, args.views, seed=0)
    size = sum(f.stat().st_size for f in cache_dir.rglob("shard-*.npy"))
    print(f"cache written in {time.perf_counter() - started:.0f} s: {size / 1e9:.2f} GB in "
          f"{len(list(cache_dir.rglob('shard-*.npy')))} shard files")

    raw = json.loads(Path(args.config).read_text())
    raw["ClassifierSettings"].update(model_dir=str(work / "model"), epochs=args.epochs,
                                     early_stopping_patience=args.epochs)
    config_path = work / "confs.json"
    config_path.write_text(json.dumps(raw, indent=2))
    (work / "model").mkdir(exist_ok=True)
    # The backup of a training run is keyed by the sorted data's fingerprint: here there is none (an empty manifest).
    (work / "model" / "manifest.csv").write_text(",".join(MANIFEST_FIELDS) + "\n")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=train_streamed, args=(str(config_path), str(cache_dir), args.patches, args.views,
                                                        labels, results))
    child.start()
    result = results.get(timeout=24 * 3600)
    child.join()
    if child.exitcode:
        sys.exit(f"the training process failed (exit status {child.exitcode})")
    batch = raw["ClassifierSettings"]["head_batch_size"]
    print(f"index of {result['rows']:,} training rows and {result['val_rows']:,} validation rows: "
          f"{result['index_s']:.1f} s")
    epochs = len(result["history"]["loss"])
    print(f"{epochs} epoch(s) of {result['rows'] / batch:,.0f} steps of {batch}, and the standardisation's pass over "
          f"every training row first: {result['train_s']:.0f} s in all (each epoch's time is on its line above); "
          f"default strategy, {os.cpu_count()} cores")
    print("history: " + ", ".join(f"{k} {[round(v, 4) for v in vs]}" for k, vs in sorted(result["history"].items())))
    peak = result["peak_rss_kib"] / 2**20
    print(f"peak resident memory of the training process: {peak:.2f} GiB (after start-up and indexing: "
          f"{result['rss_before_kib'] / 2**20:.2f} GiB) for a {size / 2**30:.2f} GiB cache: "
          f"{'within' if peak <= 2 else 'OVER'} the 2 GiB budget")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "confs.json"), help="confs.json to start from (default: %(default)s)")
    p.add_argument("--part", choices=["extraction", "training", "both"], default="both",
                   help="which measurement to run (default: %(default)s)")
    p.add_argument("--data", help="real patches for the extraction, a folder (default: dataset_dir of the config)")
    p.add_argument("--weights", help="Inception V3 weights for the extraction (default: weights of the config)")
    p.add_argument("--images", type=int, default=400, help="patches to extract features of (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="local worker processes compared with one (default: %(default)s)")
    p.add_argument("--views", type=int, default=4, choices=range(1, 5), metavar="1..4",
                   help="views per patch in the projection and the synthetic cache (default: %(default)s)")
    p.add_argument("--patches", type=int, default=FULL_DATASET,
                   help="patches in the synthetic cache (default: %(default)s, the full dataset)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of streamed head training (default: %(default)s)")
    p.add_argument("--work-dir", help="where the caches go, kept afterwards (default: a temporary folder, removed)")
    args = p.parse_args()
    for option in ("images", "workers", "patches", "epochs"):
        if getattr(args, option) < 1:
            p.error(f"--{option} must be at least 1, not {getattr(args, option)}")
    if args.workers > 64:
        p.error(f"--workers {args.workers}: at most 64 local processes")
    from idc.core.config import load_config

    config = load_config(args.config)
    settings = {"weights": args.weights or config.classifier.weights, "image_size": config.classifier.image_size,
                "feature_layers": list(config.classifier.feature_layers), "pooling": config.classifier.pooling,
                "batch_size": config.classifier.batch_size}
    args.data = args.data or str(config.resolve(config.classifier.dataset_dir))
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="idc-cluster-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.part in ("extraction", "both"):
            extraction(args, settings, work)
        if args.part in ("training", "both"):
            streamed_training(args, work)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
