#!/usr/bin/env bash
# Installs grozd into ./.venv on a Debian 12 machine: system packages first, then the package and its
# Cython extensions. `--dev` adds what the tests need (real etcd 3.4, iproute2, the test tools).
set -euo pipefail
cd "$(dirname "$0")"
dev=0
[ "${1:-}" = --dev ] && dev=1

sudo=""
[ "$(id -u)" -ne 0 ] && sudo=sudo
pkgs="python3 python3-venv python3-dev gcc"
[ "$dev" = 1 ] && pkgs="$pkgs etcd-server etcd-client iproute2 iputils-ping iperf3 wrk iptables util-linux ethtool"
missing=""
for p in $pkgs; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$dev" = 1 ]; then
    .venv/bin/python -m pip install -q -e ".[dev]"
else
    .venv/bin/python -m pip install -q -e .
fi
echo "grozd installed: $(.venv/bin/grozd --version)"
