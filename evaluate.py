#!/usr/bin/env python3
"""Evaluate the trained model on held-out patients: streaming accuracy, full metrics, plots.

  python evaluate.py                  # the sorted test patients, on the Keras model
  python evaluate.py --precision FP16 # the same patients on the compiled IR (as the served model)
  python evaluate.py --split validation
  python evaluate.py --data DIR       # any folder in the Kaggle layout

The input size and decision rule come from the model's bundle (model.json); --threshold and
--review-band (or ClassifierSettings.threshold_override / review_band_override) override the rule.
"""

from __future__ import annotations

import argparse

from idc.core import cli
from idc.core.bundle import PRECISIONS


def main() -> int:
    p = cli.parser(__doc__.strip().splitlines()[0])
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    p.add_argument("--split", default="test", choices=["train", "validation", "test"],
                   help="sorted split to evaluate (default: %(default)s)")
    p.add_argument("--data", help="evaluate every patch under this Kaggle-layout folder instead")
    p.add_argument("--precision", type=str.upper, choices=["KERAS", *PRECISIONS], default="KERAS",
                   help="the Keras model (default) or a compiled IR: FP32, FP16, INT8")
    cli.add_decision_rule_options(p)
    p.add_argument("--report-dir", help="where the report goes (default: model/reports/<split>[_<precision>])")
    args = p.parse_args()
    config = cli.setup(args)
    from idc.training.evaluation import evaluate

    evaluate(config, split=args.split, data_dir=args.data, report_dir=args.report_dir,
             precision=args.precision.replace("KERAS", "keras"), threshold=args.threshold,
             review_band=args.review_band)
    return 0


if __name__ == "__main__":
    cli.run(main)
