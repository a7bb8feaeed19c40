"""One worker of a test cluster (tests/training/test_distributed.py), as trainer.py runs training: the
strategy from TF_CONFIG first, then the tiny stand-in trunk, then train(). Prints its training
record as the last line of stdout.

  TF_CONFIG='{"cluster": {...}, "task": {...}}' .venv/bin/python -m tests.cluster_worker CONFS_JSON

from the checkout's root: -m puts the working directory on sys.path, so `tests` imports; `idc` is installed.
"""

import json
import sys


def main() -> None:
    from idc.training import distributed

    distributed.strategy()  # before the trunk: MultiWorkerMirroredStrategy must come before any TensorFlow op
    from idc.core.config import load_config
    from idc.training.train import train
    from tests.synthetic import tiny_trunk

    record = train(load_config(sys.argv[1]), trunk=tiny_trunk())
    print(json.dumps(record, default=str), flush=True)


if __name__ == "__main__":
    main()
