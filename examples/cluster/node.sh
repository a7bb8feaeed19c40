#!/bin/bash
# One training process on one node of a cluster job; slurm_job.sh and pbs_job.sh start it on every node:
#   node.sh PROJECT_DIR PYTHON [trainer.py train options]
# The project and Python come as arguments: pbsdsh does not pass the job script's variables on.
# IDC_DRY_RUN=1: print this node's TF_CONFIG instead of training.
set -euo pipefail
cd "$1"
python=$2
shift 2
# This node's place in the cluster, from the scheduler's variables (nothing on a single machine).
tf_config=$("$python" -m idc.training.cluster)
if [ -n "$tf_config" ]; then export TF_CONFIG=$tf_config; fi
if [ "${IDC_DRY_RUN:-0}" = 1 ]; then
    echo "TF_CONFIG=${TF_CONFIG:-}"
    exit 0
fi
exec "$python" trainer.py train "$@"
