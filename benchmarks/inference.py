#!/usr/bin/env python3
"""Inference speed and memory: TensorFlow (the trained Keras model) against OpenVINO FP32,
FP16 and INT8, in ONE run.

Each engine lives in its own worker process (so its peak resident memory is its own); the
rounds alternate between engines, so a noisy neighbour slows all of them alike. Latency is
per image and includes PNG decode and preprocessing, as the server sees it.

  python benchmarks/inference.py --rounds 5 --batch 32
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("TensorFlow", "FP32", "FP16", "INT8")


def worker(engine: str, config_path: str, images: list[bytes], pipe) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from idc.core.config import load_config
    from idc.core.preprocessing import decode_image
    from idc.edge.engine import load_classifier

    config = load_config(config_path)
    classifier = load_classifier(config, "keras" if engine == "TensorFlow" else engine)
    classifier.classify(images[0])  # one more warm-up on a real patch: steady state from here
    pipe.send(("ready", classifier.describe()))
    while True:
        command, *arguments = pipe.recv()
        if command == "latency":
            (count,) = arguments
            seconds = []
            for i in range(count):
                seconds.append(classifier.classify(images[i % len(images)]).seconds)
            pipe.send(seconds)
        elif command == "batch":
            size, batches = arguments
            started = time.perf_counter()
            for b in range(batches):
                chunk = [images[(b * size + i) % len(images)] for i in range(size)]
                classifier.probabilities([decode_image(data) for data in chunk])
            pipe.send(size * batches / (time.perf_counter() - started))
        elif command == "rss":
            pipe.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        else:
            return


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "confs.json"),
                   help="confs.json of the trained model (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per engine (default: %(default)s)")
    p.add_argument("--images", type=int, default=40, help="single-image requests per round (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="the larger batch size (default: %(default)s)")
    p.add_argument("--batches", type=int, default=4, help="batches per round (default: %(default)s)")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES, metavar="ENGINE",
                   help=f"engines to compare, the first is the baseline: {', '.join(ENGINES)} "
                        f"(default: {' '.join(ENGINES)})")
    args = p.parse_args()
    for option in ("rounds", "images", "batch", "batches"):
        if getattr(args, option) < 1:
            p.error(f"--{option} must be at least 1, not {getattr(args, option)}")
    if args.rounds * args.images < 2:
        p.error("--rounds x --images must be at least 2 (for the latency percentiles)")
    if len(set(args.engines)) != len(args.engines):
        p.error("--engines: name each engine once")

    from idc.core.bundle import Bundle
    from idc.core.config import load_config

    config = load_config(args.config)
    missing = [e for e in args.engines if e != "TensorFlow" and not config.model.ir_xml(e).exists()]
    if missing:
        sys.exit(f"no IR for {', '.join(missing)}: run ./compile_ncs.sh --precision all first")
    bundle = Bundle.load(config.model.root)
    patches = config.model.read_manifest("test") or config.model.read_manifest("validation")
    images = [p.path.read_bytes() for p in patches[:200]]

    context = mp.get_context("spawn")  # a clean process per engine: nothing shared, own memory
    workers = {}
    for engine in args.engines:
        parent, child = context.Pipe()
        process = context.Process(target=worker, args=(engine, args.config, images, child))
        process.start()
        status, description = parent.recv()
        workers[engine] = (process, parent)
        print(f"{engine}: {description}", flush=True)

    latencies = {e: [] for e in args.engines}
    throughput = {e: [] for e in args.engines}
    for round_ in range(args.rounds):
        for engine, (_, pipe) in workers.items():
            pipe.send(("latency", args.images))
            latencies[engine] += pipe.recv()
            pipe.send(("batch", args.batch, args.batches))
            throughput[engine].append(pipe.recv())
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    peak = {}
    for engine, (process, pipe) in workers.items():
        pipe.send(("rss",))
        peak[engine] = pipe.recv()
        pipe.send(("stop",))
        process.join(timeout=30)

    def pct(values, q):
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000

    base = args.engines[0]
    rows = {}
    for engine in args.engines:
        lat = latencies[engine]
        rows[engine] = {"b1_ips": len(lat) / sum(lat), "p50": pct(lat, 50), "p99": pct(lat, 99),
                        "bN_ips": statistics.median(throughput[engine]), "rss": peak[engine]}
    print(f"\nimage size {bundle.image_size} (model.json), {os.cpu_count()} cores, "
          f"{args.rounds} rounds x {args.images} single images + {args.batches} batches of {args.batch}")
    print(f"{'engine':<11}{'batch-1 img/s':>14}{'p50 ms':>8}{'p99 ms':>8}{f'batch-{args.batch} img/s':>16}"
          f"{'peak RSS MB':>12}{'b1 x' + base:>16}{f'b{args.batch} x' + base:>16}")
    for engine, r in rows.items():
        print(f"{engine:<11}{r['b1_ips']:>14.1f}{r['p50']:>8.1f}{r['p99']:>8.1f}{r['bN_ips']:>16.1f}"
              f"{r['rss']:>12.0f}{r['b1_ips'] / rows[base]['b1_ips']:>16.2f}"
              f"{r['bN_ips'] / rows[base]['bN_ips']:>16.2f}")


if __name__ == "__main__":
    main()
