#!/usr/bin/env bash
# System packages the real-component tests need (Debian): the Prometheus server, SLURM
# (slurmctld, slurmd, sbatch ...) and munge. Installs only what is missing; needs root and apt
# (CI machines and this dev VM have both); without them the tests that need these skip.
set -euo pipefail
missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ] || missing+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || [ -x /usr/sbin/munged ] || missing+=(munge)
if [ ${#missing[@]} = 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${missing[*]} and no root/apt to install them; their tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "system-deps: installing ${missing[*]}"
apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
# The Debian packages may start services; distq's tests run their own daemons.
pkill -x prometheus 2>/dev/null || true
pkill -x slurmctld 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
