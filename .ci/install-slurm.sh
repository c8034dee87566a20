#!/usr/bin/env bash
# Install what the Slurm tests start for real: Debian's Slurm daemons and munge (about 30 s).
# Needs root and apt-get; prints why and exits 1 otherwise.
set -euo pipefail
if command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-slurm: needs root and apt-get; the Slurm tests will be skipped" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge >/dev/null
command -v slurmctld >/dev/null && command -v munged >/dev/null
