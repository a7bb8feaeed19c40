"""One worker of a test cluster (tests/training/test_distributed.py), as trainer.py runs training: the
strategy from TF_CONFIG first, then the tiny stand-in trunk, then train(). Prints its training
record as the last line of stdout.

  TF_CONFIG='{"cluster": {...}, "task": {...}}' python tests/cluster_worker.py CONFS_JSON
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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
