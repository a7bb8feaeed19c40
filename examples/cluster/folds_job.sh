#!/bin/bash
# Patient folds (benchmarks/ablation.py --folds) on a Slurm cluster: a job array, one fold of one variant
# per task, trained and evaluated on its held-out patients. Submit from the project folder, on a file
# system every node sees (examples/cluster/README.md):
#   .venv/bin/python trainer.py sort ...                    # once: the split the folds are drawn from
#   .venv/bin/python benchmarks/ablation.py --folds 5 --variants tta tta_slide --work-dir $PWD/folds --fold-jobs prepare
#   sbatch --array=1-10 --export=ALL,FOLDS=$PWD/folds examples/cluster/folds_job.sh   # 1-N: N folders listed
#   .venv/bin/python benchmarks/ablation.py --folds 5 --variants tta tta_slide --work-dir $PWD/folds --fold-jobs collect
# IDC_DRY_RUN=1 prints the task's steps instead of running them.
#SBATCH --job-name=idc-folds
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --exclusive
#SBATCH --time=4:00:00
#SBATCH --output=idc-folds-%A_%a.log
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:?submit this script with sbatch}"
PYTHON=${PYTHON:-.venv/bin/python}
run() { if [ "${IDC_DRY_RUN:-0}" = 1 ]; then echo "+ $*"; else "$@"; fi; }

# The fold folders that --fold-jobs prepare wrote (by variant, then fold): this task trains the Nth.
mapfile -t configs < <(ls "${FOLDS:?set FOLDS to the --work-dir of ablation.py --fold-jobs prepare}"/*/fold-*/confs.json | sort -V)
task=${SLURM_ARRAY_TASK_ID:?submit with --array=1-N}
if [ "$task" -lt 1 ] || [ "$task" -gt "${#configs[@]}" ]; then
    echo "array task $task, but $FOLDS holds ${#configs[@]} fold folders: submit with --array=1-${#configs[@]}" >&2
    exit 2
fi
config=${configs[$((task - 1))]}
run "$PYTHON" trainer.py train --config "$config"
run "$PYTHON" evaluate.py --config "$config" --split validation
