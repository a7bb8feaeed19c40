#!/usr/bin/env python3
r"""Ablation: what each element of training adds, on the validation and the test patients, and what
it costs in training time and memory.

Each variant is confs.json with a few ClassifierSettings changed. It trains (`trainer.py train`) in
its own model folder, as a child process (so the time and peak memory are its own), on the split
already sorted in --model-dir, sharing that folder's bottleneck cache (a view computed once serves
every variant: the training times are with a warm cache unless a variant adds views), then is
evaluated on the validation and the test patients (`evaluate.py`). Choose between variants on the
VALIDATION figures; the test figures are reported, not used to choose.

  python trainer.py sort ...    # once: the split every variant shares
  python benchmarks/ablation.py --variants head views tta stain mixed2 fine_tune fine_tune_stain patch_cnn reinhard strong_stain

With --folds K the choice is made on many patients instead of the 30 validation patients: the
training and validation patients are split into K patient folds (idc.training.folds), each variant
trains K times with one fold held out, and the table gives each variant's mean and spread over the
folds; the test patients are not evaluated at all.

  python benchmarks/ablation.py --folds 5 --variants tta strong_stain

On a cluster each fold can train as a job of its own (examples/cluster/folds_job.sh, a Slurm job
array): --fold-jobs prepare writes the fold folders, the jobs train and evaluate them, --fold-jobs
collect makes the table. The folds share one bottleneck cache (its shard writes are locked).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from idc.training.folds import make_folds
from training import run_child  # benchmarks/training.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
DIHEDRAL = ["identity", "hflip", "vflip", "rot90"]
# The settings every variant starts from: frozen features, flips and rotations, test-time averaging; a patch
# CNN, where a variant has one, averaged with the head (as those rows were measured; the default mixes less).
BASE = {"train_views": DIHEDRAL, "test_time_augmentation": True, "fine_tune_blocks": 0, "patch_cnn_epochs": 0,
        "scan_invariance": 0.0, "head_hidden_units": 0, "patch_cnn_weight": 0.5}
# Stain jitter strengths, named so that each row keeps the ones it was measured with.
MILD_STAIN = {"stain_jitter": {"hed": 0.05, "brightness": 0.1, "contrast": 0.1, "saturation": 0.1}}
STRONG_STAIN = {"stain_jitter": {"hed": 0.1, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2}}
# The `jpeg` row (the patch CNN with strong stain jitter, a JPEG view), which the rows after it build on, and
# the default model (`jpeg_mlp_cnn0.25`).
JPEG = {**BASE, **STRONG_STAIN, "patch_cnn_epochs": 16, "train_views": [*DIHEDRAL, "jpeg1"]}
DEFAULT = {**JPEG, "head_hidden_units": 256, "patch_cnn_weight": 0.25}
# name -> (what it adds, ClassifierSettings changes); each builds on the one before it
VARIANTS = {
    "head": ("new softmax layer on frozen mixed0+mixed1 features, one view",
             {**BASE, "train_views": ["identity"], "test_time_augmentation": False}),
    "views": ("+ flipped and rotated copies in training", {**BASE, "test_time_augmentation": False}),
    "tta": ("+ test-time averaging over the 4 views", BASE),
    "tta_jpeg": ("tta + a JPEG-compressed copy per patch (frozen features only: cheap enough for folds)",
                 {**BASE, "train_views": [*DIHEDRAL, "jpeg1"]}),
    "tta_jpeg2": ("tta_jpeg with a second JPEG-compressed copy per patch (frozen features only)",
                  {**BASE, "train_views": [*DIHEDRAL, "jpeg1", "jpeg2"]}),
    "tta_jpeg_inv0.1": ("tta_jpeg, the head also penalised for how far JPEG compression moves its answer "
                        "(scan_invariance 0.1; frozen features only)",
                        {**BASE, "train_views": [*DIHEDRAL, "jpeg1"], "scan_invariance": 0.1}),
    "tta_jpeg_inv0.3": ("tta_jpeg_inv0.1 at scan_invariance 0.3",
                        {**BASE, "train_views": [*DIHEDRAL, "jpeg1"], "scan_invariance": 0.3}),
    "tta_jpeg_inv1": ("tta_jpeg_inv0.1 at scan_invariance 1",
                      {**BASE, "train_views": [*DIHEDRAL, "jpeg1"], "scan_invariance": 1.0}),
    "tta_jpeg_blur_inv0.3": ("tta_jpeg + a blurred copy per patch (Gaussian, standard deviation 0.25-1 px), the head penalised for how far the JPEG and blurred copies move its answer "
                             "(scan_invariance 0.3)",
                             {**BASE, "train_views": [*DIHEDRAL, "jpeg1", "blur1"], "scan_invariance": 0.3}),
    "tta_jpeg_stain": ("tta_jpeg + 2 stain-jittered copies per patch (HED 0.1; brightness, contrast, saturation 0.2; "
                       "frozen features only)",
                       {**BASE, **STRONG_STAIN, "train_views": [*DIHEDRAL, "jpeg1", "stain1", "stain2"]}),
    "tta_jpeg_mlp": ("tta_jpeg with a hidden layer in the head (256 ReLU units, dropout 0.3; frozen features only)",
                     {**BASE, "train_views": [*DIHEDRAL, "jpeg1"], "head_hidden_units": 256}),
    "tta_jpeg_mlp_stain": ("tta_jpeg_mlp + 2 stain-jittered copies per patch (as tta_jpeg_stain; frozen features only)",
                           {**BASE, **STRONG_STAIN, "train_views": [*DIHEDRAL, "jpeg1", "stain1", "stain2"],
                            "head_hidden_units": 256}),
    "tta_jpeg_mlp512": ("tta_jpeg_mlp with 512 hidden units (frozen features only)",
                        {**BASE, "train_views": [*DIHEDRAL, "jpeg1"], "head_hidden_units": 512}),
    "tta_slide": ("tta, each patient's patches stain-normalised with the statistics of all their tissue (per slide)",
                  {**BASE, "stain_normalization": "slide"}),
    "stain": ("+ 2 stain-jittered copies per patch (frozen features)",
              {**BASE, **MILD_STAIN, "train_views": [*DIHEDRAL, "stain1", "stain2"]}),
    "mixed2": ("tta, with mixed2's features added to mixed0's and mixed1's",
               {**BASE, "feature_layers": ["mixed0", "mixed1", "mixed2"]}),
    "fine_tune": ("tta + fine-tuning mixed0 and mixed1 end to end (flips, rotations)", {**BASE, "fine_tune_blocks": 2}),
    "fine_tune_stain": ("tta + fine-tuning with flips, rotations and stain jitter",
                        {**BASE, **MILD_STAIN, "train_views": [*DIHEDRAL, "stain1"], "fine_tune_blocks": 2}),
    "patch_cnn": ("tta, averaged with a patch CNN trained from scratch (16 epochs, mild stain jitter)",
                  {**BASE, **MILD_STAIN, "patch_cnn_epochs": 16}),
    "reinhard": ("patch_cnn, on Reinhard stain-normalised images (the model's first layer)",
                 {**BASE, **MILD_STAIN, "patch_cnn_epochs": 16, "stain_normalization": "reinhard"}),
    "strong_stain": ("patch_cnn, its stain jitter doubled (HED 0.1; brightness, contrast, saturation 0.2)",
                     {**BASE, **STRONG_STAIN, "patch_cnn_epochs": 16}),
    "jpeg": ("strong_stain, with a JPEG-compressed copy per patch (quality 60-95, 4:2:0, at a random block phase; "
             "the patch CNN sees half its patches compressed), as slide scanners store tiles: the default until jpeg_mlp",
             JPEG),
    "jpeg_mlp": ("jpeg, with a hidden layer in the head (256 ReLU units, dropout 0.3): the default until "
                 "jpeg_mlp_cnn0.25",
                 {**JPEG, "head_hidden_units": 256}),
    "jpeg_mlp_cnn0.25": ("jpeg_mlp, the patch CNN a quarter of the answer instead of half (chosen out of fold: "
                         "benchmarks/ensemble_weight.py): the default",
                         DEFAULT),
    "shift4": ("jpeg_mlp_cnn0.25, the patch CNN's patches moved by up to 4 px (random_shift)",
               {**DEFAULT, "random_shift": 4}),
    "jpeg_inv": ("jpeg, the head penalised for how far JPEG compression moves its answer (scan_invariance 0.3)",
                 {**JPEG, "scan_invariance": 0.3}),
    "jpeg_blur_inv": ("jpeg_inv with a blurred copy per patch too (the patch CNN blurs half its patches), "
                      "penalised alike",
                      {**JPEG, "train_views": [*DIHEDRAL, "jpeg1", "blur1"], "scan_invariance": 0.3}),
}


def configure(folder: Path, source: Path, changes: dict, config: dict) -> Path:
    """The variant's confs.json in `folder` (a model folder), with the data and weights `source` was sorted with."""
    settings = {**config["ClassifierSettings"], **changes, "model_dir": str(folder)}
    options = source / "trainer_options.json"  # the data and weights the split was sorted with
    if options.exists():
        settings.update(json.loads(options.read_text()))
    conf = folder / "confs.json"
    conf.write_text(json.dumps({**config, "ClassifierSettings": settings}, indent=2))
    return conf


def train_and_evaluate(folder: Path, conf: Path, splits: tuple[str, ...]) -> dict:
    """`trainer.py train`, then `evaluate.py` on each split, in `folder`: time, memory and figures."""
    log = folder / "ablation.log"
    seconds, peak = run_child([sys.executable, str(ROOT / "trainer.py"), "train", "--config", str(conf)], log)
    record = json.loads((folder / "training.json").read_text())
    row = {"train_seconds": round(seconds), "peak_rss_gib": round(peak, 2),
           "bottlenecks_computed": record["bottleneck_cache"]["train"]["computed"]}
    for split in splits:
        run_child([sys.executable, str(ROOT / "evaluate.py"), "--config", str(conf), "--split", split], log)
        metrics = json.loads((folder / "reports" / split / "metrics.json").read_text())
        row[split] = figures(metrics)
    return row


def figures(metrics: dict) -> dict:
    """What the tables show of an evaluation's metrics.json."""
    context = metrics.get("slide_context") or {}
    return {"balanced_accuracy": metrics["balanced_accuracy"], "f1_idc": metrics["f1_idc"],
            "roc_auc": metrics["roc_auc"], "ci": metrics["intervals_95"]["balanced_accuracy"],
            "context_balanced_accuracy": context.get("balanced_accuracy"),
            "context_f1_idc": context.get("f1_idc"), "patients": metrics["patients"]}


def run_variant(name: str, changes: dict, source: Path, work: Path, config: dict) -> dict:
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    (source / "bottlenecks").mkdir(exist_ok=True)  # a fresh sort has no cache yet: the variants still share one
    for shared in ("train", "validation", "test", "manifest.csv", "bottlenecks"):
        if not (folder / shared).exists() and (source / shared).exists():
            (folder / shared).symlink_to(source / shared)
    conf = configure(folder, source, changes, config)
    return {"variant": name, **train_and_evaluate(folder, conf, ("validation", "test"))}


METRICS_FIGURES = ("balanced_accuracy", "roc_auc", "f1_idc", "context_balanced_accuracy")
PER_PATIENT_FIGURES = ("patient_sensitivity", "patient_specificity")
FOLD_FIGURES = METRICS_FIGURES + PER_PATIENT_FIGURES


def fold_configs(name: str, changes: dict, source: Path, work: Path, config: dict, k: int) -> list[Path]:
    """The variant's k fold folders under work/name (idc.training.folds), each with its confs.json."""
    return [configure(folder, source, changes, config)
            for folder in make_folds(source, work / name, k, seed=config["ClassifierSettings"].get("random_seed", 42))]


def fold_row(folder: Path, row: dict | None = None) -> dict:
    """One fold's figures: from this run's `row`, or, for a fold a separate job trained and evaluated,
    from its training.json and reports/validation/metrics.json (peak memory is then unknown)."""
    if row is None:
        metrics_file = folder / "reports" / "validation" / "metrics.json"
        if not metrics_file.exists():
            raise SystemExit(f"{metrics_file} does not exist: that fold's job has not finished (train, then "
                             "evaluate.py --split validation)")
        row = {"train_seconds": round(json.loads((folder / "training.json").read_text())["seconds"]), "peak_rss_gib": None,
               "validation": figures(json.loads(metrics_file.read_text()))}
    return {"fold": folder.name, "train_seconds": row["train_seconds"], "peak_rss_gib": row["peak_rss_gib"],
            **{key: row["validation"][key] for key in ("patients", *METRICS_FIGURES)}, **per_patient_means(folder)}


def per_patient_means(folder: Path) -> dict:
    """The mean over a fold's patients of each one's sensitivity and specificity (over the patients with
    patches of that class), from its report's per_patient.csv. The pooled figures weigh a patient by
    their patches: a rule that pulls each patient's patches towards that patient's majority class raises
    them while every patient's own figures fall (docs/results.md, "More for the head")."""
    with (folder / "reports" / "validation" / "per_patient.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    means = {}
    for field in ("sensitivity", "specificity"):
        values = [float(r[field]) for r in rows if r[field]]
        means[f"patient_{field}"] = statistics.fmean(values) if values else None
    return means


def summarise_folds(name: str, folds: list[dict]) -> dict:
    """Mean and spread (sample standard deviation) over the folds."""
    summary = {}
    for key in FOLD_FIGURES:
        values = [f[key] for f in folds if f[key] is not None]
        if values:
            summary[key] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    peaks = [f["peak_rss_gib"] for f in folds if f["peak_rss_gib"] is not None]
    return {"variant": name, "folds": folds, "summary": summary,
            "train_seconds": sum(f["train_seconds"] for f in folds), "peak_rss_gib": max(peaks) if peaks else None}


def run_folds(name: str, changes: dict, source: Path, work: Path, config: dict, k: int) -> dict:
    """The variant trained k times, each fold's patients held out and evaluated; the test patients are
    not looked at."""
    folds = []
    for conf in fold_configs(name, changes, source, work, config, k):
        folds.append(fold_row(conf.parent, train_and_evaluate(conf.parent, conf, ("validation",))))
        print(json.dumps({"variant": name, **folds[-1]}), flush=True)
    return summarise_folds(name, folds)


def print_fold_table(rows: list[dict]) -> None:
    print(f"\n{'variant':<16} {'folds':>5} {'val bal.acc mean (sd)':>22} {'AUC mean (sd)':>16} "
          f"{'+context mean (sd)':>19} {'per patient sens/spec':>21} {'train s':>7} {'peak GiB':>8}  what it adds")
    for r in rows:
        cells = []
        for key in ("balanced_accuracy", "roc_auc", "context_balanced_accuracy"):
            figure = r["summary"].get(key)
            cells.append(f"{figure['mean']:.4f} ({figure['sd']:.4f})" if figure else "-")
        patient = "/".join(f"{r['summary'][key]['mean']:.4f}" if key in r["summary"] else "-"
                           for key in PER_PATIENT_FIGURES)
        peak = "-" if r["peak_rss_gib"] is None else f"{r['peak_rss_gib']:.2f}"
        print(f"{r['variant']:<16} {len(r['folds']):>5} {cells[0]:>22} {cells[1]:>16} {cells[2]:>19} {patient:>21} "
              f"{r['train_seconds']:>7} {peak:>8}  {VARIANTS[r['variant']][0]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "confs.json"), help="confs.json to start from (default: %(default)s)")
    p.add_argument("--model-dir", help="the sorted model folder whose split and cache every variant shares "
                                       "(default: model_dir of the config)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="which variants to run, in order (default: all)")
    p.add_argument("--work-dir", help="keep each variant's model folder here (default: a temp folder)")
    p.add_argument("--folds", type=int, default=0, metavar="K",
                   help="choose on K patient folds of the training and validation patients instead: each "
                        "variant trains K times, each fold's patients held out and evaluated; the test "
                        "patients are not evaluated (default: the sorted split, validation and test)")
    p.add_argument("--fold-jobs", choices=("prepare", "collect"),
                   help="with --folds, for a cluster that trains each fold as a job of its own: 'prepare' writes each "
                        "variant's fold folders and their confs.json under --work-dir and lists them (submit "
                        "examples/cluster/folds_job.sh); 'collect' summarises them once the jobs have finished "
                        "(default: train and evaluate every fold here, one after another)")
    args = p.parse_args()
    if args.fold_jobs and not (args.folds and args.work_dir):
        p.error("--fold-jobs needs --folds K and --work-dir (the folder the jobs share)")
    config = json.loads(Path(args.config).read_text())
    source = Path(args.model_dir or config["ClassifierSettings"]["model_dir"])
    source = (source if source.is_absolute() else Path(args.config).resolve().parent / source).resolve()
    if not (source / "manifest.csv").exists():
        p.error(f"{source} has no manifest.csv: sort first (python trainer.py sort ...)")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="idc-ablation-")).resolve()
    print(f"machine: {os.cpu_count()} cores; split and cache from {source}; model folders under {work}")
    rows = []
    if args.fold_jobs == "prepare":
        for name in args.variants:
            for conf in fold_configs(name, VARIANTS[name][1], source, work, config, args.folds):
                print(conf)
        return
    if args.folds:
        for name in args.variants:
            if args.fold_jobs == "collect":
                folders = [work / name / f"fold-{i + 1}" for i in range(args.folds)]
                rows.append(summarise_folds(name, [fold_row(folder) for folder in folders]))
            else:
                rows.append(run_folds(name, VARIANTS[name][1], source, work, config, args.folds))
        print_fold_table(rows)
        return
    for name in args.variants:
        rows.append(run_variant(name, VARIANTS[name][1], source, work, config))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'variant':<16} {'val bal.acc':>11} {'+context':>8} {'test bal.acc':>12} {'+context':>8} "
          f"{'test F1':>7} {'train s':>7} {'peak GiB':>8}  what it adds")
    for r in rows:
        v, t = r["validation"], r["test"]
        print(f"{r['variant']:<16} {v['balanced_accuracy']:>11.4f} {v['context_balanced_accuracy'] or float('nan'):>8.4f} "
              f"{t['balanced_accuracy']:>12.4f} {t['context_balanced_accuracy'] or float('nan'):>8.4f} "
              f"{t['f1_idc']:>7.4f} {r['train_seconds']:>7} {r['peak_rss_gib']:>8.2f}  {VARIANTS[r['variant']][0]}")


if __name__ == "__main__":
    main()
