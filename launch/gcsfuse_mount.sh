#!/usr/bin/env bash
# Mounts a GCS bucket at /mnt/BUCKET with Cloud Storage FUSE (installing gcsfuse
# from Google's apt repository if needed), so that every host of a TPU slice sees
# the same workdir as an ordinary path. Idempotent. Run on each worker by
# `launch/tpu_vm.sh install`.
#
# Usage: launch/gcsfuse_mount.sh [--dry-run] BUCKET
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
(($# == 1)) || {
  echo "usage: gcsfuse_mount.sh [--dry-run] BUCKET" >&2
  exit 2
}
BUCKET="${1#gs://}"
[[ "${BUCKET}" =~ ^[a-z0-9][a-z0-9._-]*$ ]] || {
  echo "gcsfuse_mount.sh: '${BUCKET}' is not a bucket name" >&2
  exit 2
}
MOUNT="/mnt/${BUCKET}"

run() {
  if ((DRY_RUN)); then
    local line
    line="$(printf '%q ' "$@")"
    echo "${line% }"
  else
    "$@"
  fi
}

if ! command -v gcsfuse > /dev/null 2>&1 || ((DRY_RUN)); then
  # https://cloud.google.com/storage/docs/cloud-storage-fuse/install (Debian/Ubuntu)
  repo="gcsfuse-$(lsb_release -c -s 2> /dev/null || echo jammy)"
  run sudo install -d -m 0755 /usr/share/keyrings
  run sudo curl -fsSLo /usr/share/keyrings/cloud.google.asc https://packages.cloud.google.com/apt/doc/apt-key.gpg
  run sudo sh -c "echo 'deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt ${repo} main' > /etc/apt/sources.list.d/gcsfuse.list"
  run sudo apt-get update -q
  run sudo apt-get install -y -q gcsfuse
fi
run sudo mkdir -p "${MOUNT}"
run sudo chown "$(id -u):$(id -g)" "${MOUNT}"
if ((DRY_RUN)) || ! mountpoint -q "${MOUNT}"; then
  run gcsfuse --implicit-dirs "${BUCKET}" "${MOUNT}"
fi
