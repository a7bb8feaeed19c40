#!/bin/bash
# Train the IDC classifier on a PBS/Torque cluster, as the 2018 article did on Intel's DevCloud:
# sort -> train on every node -> evaluate, in one job. Submit from the project folder, on a file system
# every node sees (examples/cluster/README.md):
#   qsub examples/cluster/pbs_job.sh
#   qsub -v DATA=/shared/IDC_regular_ps50_idx5,CONFIG=/shared/idc/confs.json examples/cluster/pbs_job.sh
# IDC_DRY_RUN=1 (qsub -v IDC_DRY_RUN=1) prints the steps, and each node's TF_CONFIG, instead of running them.
#PBS -N idc-train
#PBS -l nodes=2:ppn=2
#PBS -l walltime=12:00:00
#PBS -j oe
set -euo pipefail
cd "${PBS_O_WORKDIR:?submit this script with qsub}"
PYTHON=${PYTHON:-.venv/bin/python}   # the project's virtual environment, seen by every node
CONFIG=${CONFIG:-confs.json}         # its model_dir (default: model/) is where every node reads and writes
run() { if [ "${IDC_DRY_RUN:-0}" = 1 ]; then echo "+ $*"; else "$@"; fi; }

# 1. Sort once, here on the first node, before any worker starts.
run "$PYTHON" trainer.py sort --config "$CONFIG" ${DATA:+--data "$DATA"}
# 2. Train: one process per node (-u: once per host, however many slots it has); node.sh gives each its
#    TF_CONFIG (python -m idc.training.cluster reads PBS_NODEFILE and PBS_VNODENUM).
pbsdsh -u /bin/bash "$PWD/examples/cluster/node.sh" "$PWD" "$PYTHON" --config "$CONFIG"
# 3. Evaluate once, on the held-out test patients.
run "$PYTHON" evaluate.py --config "$CONFIG"
