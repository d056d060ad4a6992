#!/usr/bin/env bash
# An experiment file as a Slurm job array: array task i runs shard i of n (n = the array's size), each writing
# its own records file under OUT; a last job, started when every task has ended, writes the report.
#
#   job=$(sbatch --parsable --array=0-7 scripts/slurm-array.sh experiments/smollm2-variants.toml results/smollm2)
#   sbatch --dependency=afterany:$job scripts/slurm-array.sh --report results/smollm2
#
# OUT must be on a filesystem every node sees (the report reads every shard's file); models and data must be
# reachable from every node. Submitting the array again resumes: each shard skips the cells it has recorded.
# Adjust the resources below to the largest model (lctx eval prints its memory estimate).
#SBATCH --job-name=lctx
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
if [ "${1:-}" = "--report" ]; then
  out=${2:?usage: slurm-array.sh --report OUT}
  exec lctx report "$out" --out "$out/report"
fi
experiment=${1:?usage: sbatch --array=0-N slurm-array.sh EXPERIMENT.toml OUT}
out=${2:?usage: sbatch --array=0-N slurm-array.sh EXPERIMENT.toml OUT}
: "${SLURM_ARRAY_TASK_ID:?not a job array task: submit with sbatch --array=0-N}"
index=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))  # arrays may start at 1
exec lctx sweep "$experiment" --out "$out" --shard "$index/$SLURM_ARRAY_TASK_COUNT"
