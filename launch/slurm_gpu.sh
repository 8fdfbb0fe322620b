#!/usr/bin/env bash
#SBATCH --job-name=compact_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
# Multi-node GPU training of compact_jax under SLURM.
#
# One process per node drives all of that node's GPUs. compact_jax.main joins
# the job with jax.distributed.initialize() (train/mesh.py
# maybe_initialize_distributed: SLURM_NTASKS > 1), which reads the coordinator
# address, process count and process id from SLURM's environment. The mesh is
# config.mesh over all GPUs of all nodes; the workdir must be on a filesystem
# every node sees (checkpoints are written by all processes).
#
# Usage, from a login node (submits this script with sbatch):
#   WORKDIR=/shared/runs/llava_lora launch/slurm_gpu.sh [--dry-run] [--nodes=N]
#       [--gpus-per-node=G] [--partition=P] [--time=D-HH:MM:SS] [--account=A]
#       -- --config=configs/llava15_7b.py [MAIN_FLAGS...]
# Inside the allocation the same script runs
#   srun python -m compact_jax.main --workdir=WORKDIR MAIN_FLAGS...
# --dry-run prints the sbatch (or, inside an allocation, the srun) command.
#
# Environment:
#   WORKDIR  the run's directory on a shared filesystem (required)
#   VENV     virtualenv activated before srun (default: REPO/.venv if it exists)
#   PYTHON   interpreter (default python3)
set -euo pipefail

readonly SCRIPT_NAME="slurm_gpu.sh"

usage() {
  sed -n '5,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {
  echo "${SCRIPT_NAME}: $*" >&2
  exit 2
}

run() {
  if ((DRY_RUN)); then
    local line
    line="$(printf '%q ' "$@")"
    echo "${line% }"
  else
    "$@"
  fi
}

DRY_RUN=0
NODES=2
GPUS_PER_NODE=8
PARTITION=""
TIME=""
ACCOUNT=""
MAIN_ARGS=()
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --nodes=*) NODES="${1#*=}" ;;
    --gpus-per-node=*) GPUS_PER_NODE="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --account=*) ACCOUNT="${1#*=}" ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      MAIN_ARGS=("$@")
      break
      ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[[ -n "${WORKDIR:-}" ]] || die "environment variable WORKDIR is required (a directory every node sees)"
[[ "${NODES}" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '${NODES}'"
[[ "${GPUS_PER_NODE}" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '${GPUS_PER_NODE}'"
has_config=0
for arg in "${MAIN_ARGS[@]}"; do
  [[ "${arg}" == --config=* ]] && has_config=1
  [[ "${arg}" == --workdir=* ]] && die "the workdir comes from WORKDIR, not --workdir"
done
((has_config)) || die "pass the launcher's flags after '--', at least --config=configs/X.py"

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  # Login node: submit this script. sbatch runs a spooled copy, so the checkout
  # is passed along as REPO.
  REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  opts=(--nodes="${NODES}" --ntasks-per-node=1 --gpus-per-node="${GPUS_PER_NODE}")
  opts+=(--job-name=compact_jax --output="${WORKDIR}/slurm-%j.out")
  opts+=(--export="ALL,REPO=${REPO},WORKDIR=${WORKDIR}")
  [[ -n "${PARTITION}" ]] && opts+=(--partition="${PARTITION}")
  [[ -n "${TIME}" ]] && opts+=(--time="${TIME}")
  [[ -n "${ACCOUNT}" ]] && opts+=(--account="${ACCOUNT}")
  ((DRY_RUN)) || mkdir -p "${WORKDIR}"
  run sbatch "${opts[@]}" "${REPO}/launch/slurm_gpu.sh" -- "${MAIN_ARGS[@]}"
  exit 0
fi

# Inside the allocation (the batch step, on the first node).
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
cd "${REPO}"
VENV="${VENV:-${REPO}/.venv}"
if [[ -f "${VENV}/bin/activate" ]]; then
  # shellcheck disable=SC1091
  source "${VENV}/bin/activate"
fi
run srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${PYTHON:-python3}" -m compact_jax.main \
  --workdir="${WORKDIR}" "${MAIN_ARGS[@]}"
