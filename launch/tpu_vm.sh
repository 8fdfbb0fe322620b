#!/usr/bin/env bash
# Cloud TPU VM / pod-slice launcher for compact_jax.
#
# Usage:
#   launch/tpu_vm.sh [--dry-run] COMMAND [-- MAIN_FLAGS...]
#
# Commands:
#   create    create the TPU VM or pod slice
#   describe  show its state, workers and their addresses
#   install   copy this checkout (git HEAD) to every worker, pip install it there
#             (with jax[tpu] at requirements.txt's jax version), mount BUCKET
#   run       start `python3 -m compact_jax.main --workdir=WORKDIR MAIN_FLAGS...` on
#             every worker at once (--worker=all), detached, logging to ~/compact_jax_run.log
#   logs      stream worker WORKER's log (process 0 does the logging)
#   delete    delete the TPU VM or slice (billing stops)
#   up        create, install, run, then logs
#
# --dry-run prints each command (shell-quoted, ready to paste) instead of running it.
#
# Environment:
#   PROJECT           Google Cloud project id (every command)
#   ZONE              zone with TPU capacity, e.g. us-west4-a (every command)
#   TPU_NAME          name of the TPU VM or slice (every command)
#   ACCELERATOR_TYPE  e.g. v5litepod-8, v5litepod-64, v5p-8 (create)
#   RUNTIME_VERSION   TPU software version (create); default from ACCELERATOR_TYPE:
#                     v5litepod-* v2-alpha-tpuv5-lite, v5p-* v2-alpha-tpuv5, v6e-* v2-alpha-tpuv6e
#   BUCKET            GCS bucket name (no gs://), mounted with gcsfuse at /mnt/BUCKET on
#                     every worker so that all hosts share the workdir (install, run)
#   RUN_NAME          the run's workdir is /mnt/BUCKET/compact_jax/RUN_NAME (default TPU_NAME)
#   WORKER            worker whose log `logs` streams (default 0)
#   SPOT              1 creates a Spot TPU (create)
#
# Example (v5e-8, the COMPACT small setting):
#   export PROJECT=my-project ZONE=us-west4-a TPU_NAME=cj-v5e ACCELERATOR_TYPE=v5litepod-8
#   export BUCKET=my-bucket
#   launch/tpu_vm.sh up -- --config=configs/siglip_gemma2b.py \
#       --config.mesh='(("data",1),("fsdp",-1),("tensor",1))'
set -euo pipefail

readonly SCRIPT_NAME="tpu_vm.sh"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
readonly REMOTE_DIR="compact_jax"
readonly REMOTE_LOG="compact_jax_run.log"

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {
  echo "${SCRIPT_NAME}: $*" >&2
  exit 2
}

DRY_RUN=0
COMMAND=""
MAIN_ARGS=()
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      MAIN_ARGS=("$@")
      break
      ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *)
      [[ -z "${COMMAND}" ]] || die "one command at a time, got '${COMMAND}' and '$1'"
      COMMAND="$1"
      ;;
  esac
  shift
done
[[ -n "${COMMAND}" ]] || die "no command given; one of create describe install run logs delete up (see --help)"

require() {
  local name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || die "environment variable ${name} is required for '${COMMAND}' (see --help)"
  done
}

# Runs a command, or prints it shell-quoted under --dry-run.
run() {
  if ((DRY_RUN)); then
    local line
    line="$(printf '%q ' "$@")"
    echo "${line% }"
  else
    "$@"
  fi
}

tpu() {
  run gcloud compute tpus tpu-vm "$@" --project="${PROJECT}" --zone="${ZONE}"
}

runtime_version() {
  if [[ -n "${RUNTIME_VERSION:-}" ]]; then
    echo "${RUNTIME_VERSION}"
    return
  fi
  # https://cloud.google.com/tpu/docs/runtimes (PyTorch and JAX)
  case "${ACCELERATOR_TYPE}" in
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=${ACCELERATOR_TYPE}; set RUNTIME_VERSION" ;;
  esac
}

jax_version() {
  local version
  version="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "${REPO}/requirements.txt")"
  [[ -n "${version}" ]] || die "no 'jax==' pin in ${REPO}/requirements.txt"
  echo "${version}"
}

cmd_create() {
  require PROJECT ZONE TPU_NAME ACCELERATOR_TYPE
  local version extra=()
  version="$(runtime_version)"
  [[ "${SPOT:-0}" == "1" ]] && extra+=(--spot)
  tpu create "${TPU_NAME}" --accelerator-type="${ACCELERATOR_TYPE}" --version="${version}" "${extra[@]}"
}

cmd_describe() {
  require PROJECT ZONE TPU_NAME
  tpu describe "${TPU_NAME}"
}

cmd_install() {
  require PROJECT ZONE TPU_NAME BUCKET
  local tarball jax
  tarball="${TMPDIR:-/tmp}/compact_jax-${TPU_NAME}.tar.gz"
  jax="$(jax_version)"
  # git HEAD only: commit (or stash-apply) local changes first.
  run git -C "${REPO}" archive --format=tar.gz --output="${tarball}" HEAD
  tpu scp "${tarball}" "${TPU_NAME}:~/${REMOTE_DIR}.tar.gz" --worker=all
  local remote
  remote="set -e; rm -rf ~/${REMOTE_DIR}; mkdir -p ~/${REMOTE_DIR}"
  remote+="; tar -xzf ~/${REMOTE_DIR}.tar.gz -C ~/${REMOTE_DIR}; cd ~/${REMOTE_DIR}"
  remote+="; python3 -m pip install -q -r requirements.txt -e . 'jax[tpu]==${jax}'"
  remote+="; bash launch/gcsfuse_mount.sh $(printf '%q' "${BUCKET}")"
  tpu ssh "${TPU_NAME}" --worker=all --command="${remote}"
}

workdir() {
  echo "/mnt/${BUCKET}/compact_jax/${RUN_NAME:-${TPU_NAME}}"
}

cmd_run() {
  require PROJECT ZONE TPU_NAME BUCKET
  local arg has_config=0
  for arg in "${MAIN_ARGS[@]}"; do
    [[ "${arg}" == --config=* ]] && has_config=1
    [[ "${arg}" == --workdir=* ]] && die "run sets --workdir itself ($(workdir)); set RUN_NAME instead"
  done
  ((has_config)) || die "run needs the launcher's flags after '--', at least --config=configs/X.py"
  local dir remote
  dir="$(workdir)"
  # Every worker runs the same command (SPMD); setsid + nohup keep it alive when
  # the ssh session ends, and `logs` follows it.
  remote="cd ~/${REMOTE_DIR} && mkdir -p $(printf '%q' "${dir}") && setsid nohup python3 -m compact_jax.main"
  remote+=" --workdir=$(printf '%q' "${dir}")"
  for arg in "${MAIN_ARGS[@]}"; do
    remote+=" $(printf '%q' "${arg}")"
  done
  remote+=" > ~/${REMOTE_LOG} 2>&1 < /dev/null &"
  tpu ssh "${TPU_NAME}" --worker=all --command="${remote}"
}

cmd_logs() {
  require PROJECT ZONE TPU_NAME
  local worker="${WORKER:-0}"
  [[ "${worker}" =~ ^[0-9]+$ ]] || die "WORKER must be a worker index, got '${worker}'"
  tpu ssh "${TPU_NAME}" --worker="${worker}" --command="tail -n +1 -F ~/${REMOTE_LOG}"
}

cmd_delete() {
  require PROJECT ZONE TPU_NAME
  tpu delete "${TPU_NAME}" --quiet
}

case "${COMMAND}" in
  create) cmd_create ;;
  describe) cmd_describe ;;
  install) cmd_install ;;
  run) cmd_run ;;
  logs) cmd_logs ;;
  delete) cmd_delete ;;
  up)
    require PROJECT ZONE TPU_NAME ACCELERATOR_TYPE BUCKET
    cmd_create
    cmd_install
    cmd_run
    cmd_logs
    ;;
  *) die "unknown command '${COMMAND}'; one of create describe install run logs delete up" ;;
esac
