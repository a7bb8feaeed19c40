#!/usr/bin/env python3
"""Sort the IDC dataset by patient, retrain Inception V3's final layer, export the model.

  python trainer.py sort    # dataset -> model/{train,validation,test}/{0,1} + manifest.csv
  python trainer.py train   # bottlenecks (cached) -> new softmax head -> model/DevCloudIDC.keras
  python trainer.py all     # sort, train, then evaluate on the test patients
"""

from __future__ import annotations

from idc import cli
from idc.config import with_overrides


def main() -> int:
    p = cli.parser(__doc__.strip().splitlines()[0])
    p.add_argument("step", choices=["sort", "train", "all"], help="what to run")
    p.add_argument("--data", help="dataset folder in the Kaggle layout (default: dataset_dir)")
    p.add_argument("--patients-file", help="CSV of patient_id,reference_split (default: patients_file)")
    p.add_argument("--weights", help='"imagenet", a weights file, or a TF Hub handle / SavedModel dir')
    p.add_argument("--feature-layers", nargs="+", help="Inception V3 layers that feed the head (e.g. mixed0 mixed1)")
    p.add_argument("--image-size", type=int, help="input size in pixels (the article: 299)")
    p.add_argument("--samples-per-class", help='training patches per class, or "all"')
    p.add_argument("--model-dir", help="where artefacts go (default: model_dir)")
    args = p.parse_args()
    config = cli.setup(args)
    overrides = {
        "dataset_dir": args.data, "patients_file": args.patients_file, "weights": args.weights,
        "feature_layers": args.feature_layers, "image_size": args.image_size, "model_dir": args.model_dir,
        "samples_per_class": (args.samples_per_class if args.samples_per_class in (None, "all")
                              else int(args.samples_per_class)),
    }
    config = with_overrides(config, "ClassifierSettings", **{k: v for k, v in overrides.items() if v is not None})

    if args.step in ("sort", "all"):
        sort(config)
    if args.step in ("train", "all"):
        from idc.training import train

        record = train(config)
        print(f"trained {record['model']} in {record['seconds']} s "
              f"({record['epochs_run']} epochs; bottlenecks {record['bottleneck_cache']})")
    if args.step == "all":
        from idc.evaluation import evaluate

        evaluate(config, split="test")
    return 0


def sort(config) -> None:
    from idc import data

    s = config.classifier
    patients = (data.read_patients_file(config.resolve(s.patients_file), s.patients_file_splits)
                if s.patients_file else None)
    report = data.sort_dataset(config.resolve(s.dataset_dir), config.model_dir,
                               validation_fraction=s.validation_fraction, test_fraction=s.test_fraction,
                               seed=s.random_seed, samples_per_class=s.samples_per_class,
                               patients_file=patients)
    print(report.table())
    print(f"manifest: {report.manifest}")


if __name__ == "__main__":
    cli.run(main)
