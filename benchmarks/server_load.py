#!/usr/bin/env python3
"""Load-test the edge server (server.py, waitress) on 127.0.0.1 with the trained model's IR.

  python benchmarks/server_load.py                          # the IR server.py serves, 2,000 requests, 4 threads
  python benchmarks/server_load.py --precision INT8
  python benchmarks/server_load.py --model-dir /tmp/tiny/model --requests 200

Starts server.py as a subprocess on a free port of 127.0.0.1 only (MQTT off, no archive, HTTP),
serving the FP16 or INT8 IR of the trained model; warms it up; sends the test patches
(model/test/*.png and up to 200 test-split patches of the manifest) from the client threads; prints
requests/s, p50/p99 latency, errors and the server process's resident memory (RSS) before and
after the measured requests. Targets: >= 20 requests/s, p99 <= 250 ms, RSS growth
< 50 MB. Exit status: 0 when every target is met, 1 when one is missed or the server fails,
2 when there is no compiled model to measure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HOST = "127.0.0.1"  # never anything else
TARGETS = {"requests_per_second": 20.0, "p99_ms": 250.0, "rss_growth_mb": 50.0}
MAX_TEST_PATCHES = 200


def parse_args(argv=None) -> argparse.Namespace:
    summary, _, details = __doc__.strip().partition("\n")
    p = argparse.ArgumentParser(description=summary, epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "confs.json"), help="confs.json (default: %(default)s)")
    p.add_argument("--model-dir", help="model folder to serve (default: ClassifierSettings.model_dir)")
    p.add_argument("--precision", choices=["FP16", "INT8"], help="IR to serve (default: what server.py serves, "
                                                                 "OpenVINO.precision)")
    p.add_argument("--requests", type=int, default=2000, help="measured requests (default: 2000)")
    p.add_argument("--threads", type=int, default=4, help="concurrent client threads (default: 4)")
    p.add_argument("--warmup", type=int, default=50, help="requests before measuring (default: 50)")
    p.add_argument("--max-seconds", type=float, default=600,
                   help="stop the measurement after this many seconds (default: 600)")
    p.add_argument("--json", help="also write the figures to this JSON file (default: none)")
    args = p.parse_args(argv)
    if not (0 < args.requests <= 100_000 and 0 < args.threads <= 64 and 0 <= args.warmup <= 10_000):
        p.error("--requests must be in 1..100000, --threads in 1..64, --warmup in 0..10000")
    if not 0 < args.max_seconds < math.inf:
        p.error(f"--max-seconds must be positive, not {args.max_seconds}")
    return args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def load_patches(model_dir: Path) -> list[bytes]:
    """The example patches model/test/*.png, then test-split patches of the manifest (bounded)."""
    from idc.core.bundle import ModelDir
    from idc.core.errors import DatasetError

    paths = sorted((model_dir / "test").glob("*.png"))
    try:
        paths += [p.path for p in ModelDir(model_dir, "").read_manifest("test")[:MAX_TEST_PATCHES]]
    except DatasetError:
        pass
    return [p.read_bytes() for p in paths if p.is_file()]


def write_bench_config(config_path: Path, model_dir: Path, port: int, folder: Path) -> Path:
    """A copy of confs.json: the model folder given, 127.0.0.1:<port>, MQTT, archive and TLS off, the
    review queue in `folder`."""
    raw = json.loads(config_path.read_text())
    raw["ClassifierSettings"]["model_dir"] = str(model_dir)
    # The review queue goes to the temporary folder, not the model directory (flagged patches are still written).
    raw["Server"].update(host=HOST, port=port, archive_dir=None, tls_cert=None, tls_key=None,
                         review_db=str(folder / "review.sqlite3"))
    raw["IoTJumpWay"]["enabled"] = False
    path = folder / "confs.json"
    path.write_text(json.dumps(raw, indent=2))
    return path


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def run_load(url: str, images: list[bytes], total: int, threads: int, headers: dict, deadline: float) -> dict:
    """`total` POSTs from `threads` threads (each with its own session); latencies and errors."""
    import requests

    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def worker():
        with requests.Session() as session:
            while time.monotonic() < deadline:
                i = next(counter)
                if i >= total:
                    return
                started = time.perf_counter()
                try:
                    response = session.post(url, data=images[i % len(images)],
                                            headers={**headers, "Content-Type": "image/png"}, timeout=30)
                    error = None if response.status_code == 200 and response.json().get("Response") == "OK" \
                        else f"{response.status_code}: {response.text[:100]}"
                except (requests.RequestException, ValueError) as err:
                    error = f"{type(err).__name__}: {err}"
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    if error:
                        errors.append(error)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    started = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=max(1.0, deadline - time.monotonic() + 35))
    wall = time.perf_counter() - started
    return {"latencies": latencies, "errors": errors, "wall": wall}


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import psutil
    import requests

    from idc.core.config import load_config
    from idc.core.errors import ConfigError

    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model_dir = Path(args.model_dir).resolve() if args.model_dir else config.model_dir
    if args.model_dir:
        from idc.core.config import with_overrides

        config = with_overrides(config, "ClassifierSettings", model_dir=str(model_dir))
    if args.precision is None:
        from idc.edge.engine import served_precision

        args.precision = served_precision(config)
    xml = config.model.ir_xml(args.precision)
    if not xml.exists():
        print(f"No {args.precision} IR of a trained model at {xml}: nothing to measure. Train the model "
              f"(trainer.py) and compile it (./compile_ncs.sh --precision {args.precision}) first.")
        return 2
    images = load_patches(model_dir)
    if not images:
        print(f"No test patches in {model_dir / 'test'} or the manifest: run `python trainer.py sort` first.")
        return 2
    key = config.Server.api_key
    headers = {"X-API-Key": key} if key else {}

    with tempfile.TemporaryDirectory(prefix="idc-bench-") as tmp:
        port = free_port()
        bench_config = write_bench_config(config.path, model_dir, port, Path(tmp))
        log_path = Path(tmp) / "server.log"
        base = f"http://{HOST}:{port}"
        print(f"Starting server.py with {xml} on {base} ...")
        with log_path.open("w") as log_file:
            process = subprocess.Popen(
                [sys.executable, str(ROOT / "server.py"), "--config", str(bench_config), "--precision", args.precision],
                stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            health = None
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    response = requests.get(f"{base}/api/health", timeout=2)
                    if response.status_code == 200:
                        health = response.json()
                        break
                except requests.ConnectionError:
                    pass
                time.sleep(0.2)
            if health is None:
                print("error: the server did not become healthy; its log:\n" + log_path.read_text()[-3000:])
                return 1
            model = health["model"]
            print(f"Server ready: {model.get('backend')} on {model.get('device')}, input {model.get('image_size')} px; "
                  f"{len(images)} distinct patches; {args.threads} client threads; {os.cpu_count()} CPUs here")
            server_process = psutil.Process(process.pid)
            rss_start = server_process.memory_info().rss
            url = f"{base}/api/infer"
            warm = run_load(url, images, args.warmup, min(args.threads, max(1, args.warmup)), headers,
                            time.monotonic() + 120) if args.warmup else {"errors": []}
            rss_before = server_process.memory_info().rss
            print(f"Measuring {args.requests} requests ...")
            load = run_load(url, images, args.requests, args.threads, headers, time.monotonic() + args.max_seconds)
            rss_after = server_process.memory_info().rss
            final_health = requests.get(f"{base}/api/health", timeout=5).json()
        finally:
            stop(process)

    latencies, errors = load["latencies"], load["errors"] + warm["errors"]
    done = len(latencies)
    mb = 1024 * 1024
    figures = {
        "precision": args.precision, "backend": model.get("backend"), "device": model.get("device"),
        "requests": done, "requested": args.requests, "threads": args.threads, "errors": len(errors),
        "seconds": round(load["wall"], 3),
        "requests_per_second": round(done / load["wall"], 2) if load["wall"] else 0.0,
        "p50_ms": round(percentile(latencies, 50) * 1000, 2) if latencies else None,
        "p99_ms": round(percentile(latencies, 99) * 1000, 2) if latencies else None,
        "max_ms": round(max(latencies) * 1000, 2) if latencies else None,
        "rss_start_mb": round(rss_start / mb, 1), "rss_before_mb": round(rss_before / mb, 1),
        "rss_after_mb": round(rss_after / mb, 1), "rss_growth_mb": round((rss_after - rss_before) / mb, 1),
        "server_requests_served": final_health["requests"]["served"],
    }
    checks = {
        "requests_per_second": figures["requests_per_second"] >= TARGETS["requests_per_second"],
        "p99_ms": figures["p99_ms"] is not None and figures["p99_ms"] <= TARGETS["p99_ms"],
        "rss_growth_mb": figures["rss_growth_mb"] < TARGETS["rss_growth_mb"],
        "errors": not errors and done == args.requests,
    }
    figures["targets_met"] = all(checks.values())
    print(f"Requests:   {done} of {args.requests} in {figures['seconds']} s, errors: {len(errors)}"
          + (f" (first: {errors[0]})" if errors else ""))
    print(f"Throughput: {figures['requests_per_second']} requests/s   (target >= {TARGETS['requests_per_second']:g})"
          f"  {'OK' if checks['requests_per_second'] else 'MISSED'}")
    print(f"Latency:    p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, max {figures['max_ms']} ms"
          f"   (target p99 <= {TARGETS['p99_ms']:g} ms)  {'OK' if checks['p99_ms'] else 'MISSED'}")
    print(f"Server RSS: {figures['rss_start_mb']} MB at start, {figures['rss_before_mb']} MB after warm-up, "
          f"{figures['rss_after_mb']} MB after; growth {figures['rss_growth_mb']} MB   "
          f"(target < {TARGETS['rss_growth_mb']:g} MB)  {'OK' if checks['rss_growth_mb'] else 'MISSED'}")
    print("All targets met." if figures["targets_met"] else
          "Missed: " + ", ".join(name for name, ok in checks.items() if not ok))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if figures["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
