#!/usr/bin/env python3
r"""Time and memory of the whole training job (sort + bottlenecks + head), and the accuracy it
reaches on held-out patients, at several input sizes.

Each size runs `trainer.py all` from scratch in its own model folder (cold bottleneck cache),
as a child process, so the wall time and the peak resident memory are the job's own.

  python benchmarks/training.py --data ../shared/data/idc-patches \
      --patients-file ../shared/data/idc-patches-patients.csv \
      --weights ../shared/weights/inception_v3_notop.weights.h5 --sizes 299 150 75
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_child(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run a child process (output appended to `log`); its wall time and peak resident memory (GiB).
    Exits with the log's end if it fails."""
    started = time.perf_counter()
    with log.open("a") as output:
        child = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage: its peak memory
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(cmd)} failed; see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started, usage.ru_maxrss / 2**20


def run_size(size: int, args, out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "trainer.py"), "all", "--config", args.config, "--image-size", str(size),
           "--model-dir", str(out)]
    for flag in ("data", "patients_file", "weights"):
        if getattr(args, flag):
            cmd += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    if args.feature_layers:
        cmd += ["--feature-layers", *args.feature_layers]
    out.mkdir(parents=True, exist_ok=True)
    seconds, peak_gib = run_child(cmd, out / "benchmark.log")
    record = json.loads((out / "training.json").read_text())
    metrics = json.loads((out / "reports" / "test" / "metrics.json").read_text())
    return {"size": size, "seconds": seconds, "bottleneck_seconds": record["bottleneck_seconds"],
            "peak_rss_gib": peak_gib,
            "train_patches": sum(record["data"]["train"]["patches"].values()),
            "balanced_accuracy": metrics["balanced_accuracy"], "f1_idc": metrics["f1_idc"],
            "roc_auc": metrics["roc_auc"], "test_patches": metrics["patches"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "confs.json"), help="confs.json to start from (default: %(default)s)")
    p.add_argument("--data", help="dataset folder in the Kaggle layout (default: dataset_dir of the config)")
    p.add_argument("--patients-file",
                   help="CSV of patient_id,reference_split (default: patients_file of the config)")
    p.add_argument("--weights", help='Inception V3 weights: "imagenet", a weights file, or a TF Hub handle / '
                                     "SavedModel dir (default: weights of the config)")
    p.add_argument("--feature-layers", nargs="+", help="Inception V3 layers that feed the head, e.g. mixed0 mixed1 "
                                                       "(default: feature_layers of the config)")
    p.add_argument("--sizes", type=int, nargs="+", default=[299, 150, 75],
                   help="input sizes in pixels to train at, each 75..1024 (default: 299 150 75)")
    p.add_argument("--work-dir", help="keep each size's model folder here (default: a temp folder)")
    args = p.parse_args()
    bad = [size for size in args.sizes if not 75 <= size <= 1024]
    if bad:
        p.error(f"--sizes must each be in 75..1024 (Inception V3), not {' '.join(map(str, bad))}")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="idc-bench-"))
    print(f"machine: {os.cpu_count()} cores; model folders under {work}")
    rows = []
    for size in sorted(args.sizes, reverse=True):
        row = run_size(size, args, work / f"size{size}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'size':>5} {'total s':>8} {'bottleneck s':>13} {'peak GiB':>9} {'train':>6} "
          f"{'test':>6} {'bal.acc':>8} {'F1 IDC':>7} {'AUC':>6}")
    for r in rows:
        print(f"{r['size']:>5} {r['seconds']:>8.0f} {r['bottleneck_seconds']:>13.0f} {r['peak_rss_gib']:>9.2f} "
              f"{r['train_patches']:>6} {r['test_patches']:>6} {r['balanced_accuracy']:>8.4f} "
              f"{r['f1_idc']:>7.4f} {r['roc_auc']:>6.4f}")


if __name__ == "__main__":
    main()
