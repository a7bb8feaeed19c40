#!/usr/bin/env python3
"""Evaluate the trained model on held-out patients: streaming accuracy, full metrics, plots.

  python evaluate.py                  # the sorted test patients
  python evaluate.py --split validation
  python evaluate.py --data DIR       # any folder in the Kaggle layout
"""

from __future__ import annotations

from idc import cli


def main() -> int:
    p = cli.parser(__doc__.strip().splitlines()[0])
    p.add_argument("--split", default="test", choices=["train", "validation", "test"],
                   help="sorted split to evaluate (default: %(default)s)")
    p.add_argument("--data", help="evaluate every patch under this Kaggle-layout folder instead")
    p.add_argument("--report-dir", help="where the report goes (default: model/reports/<split>)")
    args = p.parse_args()
    config = cli.setup(args)
    from idc.evaluation import evaluate

    evaluate(config, split=args.split, data_dir=args.data, report_dir=args.report_dir)
    return 0


if __name__ == "__main__":
    cli.run(main)
