#!/usr/bin/env bash
# System packages the real-component tests need (Debian): the Prometheus server.
# Installs only what is missing; needs root and apt (CI machines and this dev VM have both).
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: prometheus missing and no root/apt to install it; its test will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q prometheus >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null; }
# The Debian package may start a service; distq's tests run their own server.
pkill -x prometheus 2>/dev/null || true
command -v prometheus
