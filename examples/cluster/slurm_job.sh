#!/bin/bash
# Train the IDC classifier on a Slurm cluster: sort -> train on every node -> evaluate, in one job.
# Submit from the project folder, on a file system every node sees (examples/cluster/README.md):
#   sbatch examples/cluster/slurm_job.sh
#   sbatch --export=ALL,DATA=/shared/IDC_regular_ps50_idx5,CONFIG=/shared/idc/confs.json examples/cluster/slurm_job.sh
# IDC_DRY_RUN=1 prints the steps, and each node's TF_CONFIG, instead of running them.
#SBATCH --job-name=idc-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one training process per node: TensorFlow uses all of its cores
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --output=idc-train-%j.log
##SBATCH --gpus-per-node=1           # on GPU nodes
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:?submit this script with sbatch}"
PYTHON=${PYTHON:-.venv/bin/python}   # the project's virtual environment, seen by every node
CONFIG=${CONFIG:-confs.json}         # its model_dir (default: model/) is where every node reads and writes
run() { if [ "${IDC_DRY_RUN:-0}" = 1 ]; then echo "+ $*"; else "$@"; fi; }

# 1. Sort once, here on the first node, before any worker starts.
run "$PYTHON" trainer.py sort --config "$CONFIG" ${DATA:+--data "$DATA"}
# 2. Train: one process per node, given all of the node's cores (srun would bind it to one); node.sh gives
#    each its TF_CONFIG (python -m idc.training.cluster reads SLURM_STEP_NODELIST and SLURM_PROCID).
srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
    bash examples/cluster/node.sh "$PWD" "$PYTHON" --config "$CONFIG"
# 3. Evaluate once, on the held-out test patients.
run "$PYTHON" evaluate.py --config "$CONFIG"
