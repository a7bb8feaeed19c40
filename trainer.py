#!/usr/bin/env python3
"""Sort the IDC dataset by patient, retrain Inception V3's final layer, export the model.

  python trainer.py sort    # dataset -> model/{train,validation,test}/{0,1} + manifest.csv
  python trainer.py train   # bottlenecks (cached) -> new softmax head -> model/DevCloudIDC.keras + model.json
  python trainer.py all     # sort, train, then evaluate on the test patients
  python trainer.py all --extra-labels reviews.csv   # also train on patches reviewed at the edge

Options given here are remembered in the model directory (trainer_options.json): a later
`trainer.py train` or `trainer.py all` without them uses them again, and says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from idc.core import cli
from idc.core.config import with_overrides
from idc.core.files import write_text_atomically

log = logging.getLogger("trainer")
# option -> ClassifierSettings key
OPTIONS = {"--data": "dataset_dir", "--patients-file": "patients_file", "--weights": "weights",
           "--feature-layers": "feature_layers", "--image-size": "image_size",
           "--samples-per-class": "samples_per_class"}


def samples_per_class(value: str) -> int | str:
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"must be a positive integer or 'all', not {value!r}") from None


def main() -> int:
    p = cli.parser(__doc__.strip().splitlines()[0])
    p.add_argument("step", choices=["sort", "train", "all"], help="what to run")
    p.add_argument("--data", help="dataset folder in the Kaggle layout (default: dataset_dir)")
    p.add_argument("--patients-file", help="CSV of patient_id,reference_split (default: patients_file)")
    p.add_argument("--weights", help='"imagenet", a weights file, or a TF Hub handle / SavedModel dir')
    p.add_argument("--feature-layers", nargs="+", help="Inception V3 layers that feed the head (e.g. mixed0 mixed1)")
    p.add_argument("--image-size", type=int, help="input size in pixels, 75..1024 (the article: 299)")
    p.add_argument("--samples-per-class", type=samples_per_class, help='training patches per class, or "all"')
    p.add_argument("--model-dir", help="where artefacts go (default: model_dir)")
    p.add_argument("--extra-labels", metavar="CSV", help="also train on the patches reviewed at the edge "
                   "(the review station's CSV export), added to the training split after sorting")
    args = p.parse_args()
    config = cli.setup(args)
    if args.model_dir:
        config = with_overrides(config, "ClassifierSettings", model_dir=str(Path(args.model_dir).resolve()))
    given = {key: getattr(args, option[2:].replace("-", "_")) for option, key in OPTIONS.items()}
    given = {key: value for key, value in given.items() if value is not None}
    for key in ("dataset_dir", "patients_file", "weights"):  # paths on the command line: from here
        if key in given and (key != "weights" or Path(given[key]).exists()):
            given[key] = str(Path(given[key]).resolve())
    remembered = config.model.trainer_options
    previous = json.loads(remembered.read_text()) if remembered.exists() else {}
    reused = {key: value for key, value in previous.items() if key in OPTIONS.values() and key not in given}
    flags = {key: option for option, key in OPTIONS.items()}
    config = with_overrides(config, "ClassifierSettings", flags, **reused, **given)
    for key, value in reused.items():
        log.info("using %s %s from the previous run (%s)", flags[key], value, remembered)
    options = {**reused, **given}
    if options != previous:  # every worker of a cluster job runs this: write only a change, atomically
        remembered.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(remembered, json.dumps(options, indent=2) + "\n")

    if args.step in ("sort", "all"):
        sort(config)
    if args.extra_labels:
        from idc.training.data import add_extra_labels

        added, left_out = add_extra_labels(Path(args.extra_labels).resolve(), config.model)
        for why in left_out:
            log.warning("extra labels: left out %s", why)
        print(f"extra labels: {added} reviewed patches added to the training split ({len(left_out)} left out)")
    if args.step in ("train", "all"):
        from idc.training.train import train

        record = train(config)
        print(f"trained {record['model']} in {record['seconds']} s "
              f"({record['epochs_run']} epochs; bottlenecks {record['bottleneck_cache']})")
    if args.step == "all":
        from idc.training.evaluation import evaluate

        evaluate(config, split="test")
    return 0


def sort(config) -> None:
    from idc.training import data

    s = config.classifier
    patients = (data.read_patients_file(config.resolve(s.patients_file), s.patients_file_splits)
                if s.patients_file else None)
    report = data.sort_dataset(config.resolve(s.dataset_dir), config.model,
                               validation_fraction=s.validation_fraction, test_fraction=s.test_fraction,
                               seed=s.random_seed, samples_per_class=s.samples_per_class,
                               patients_file=patients)
    print(report.table())
    print(f"manifest: {report.manifest}")


if __name__ == "__main__":
    cli.run(main)
