#!/usr/bin/env bash
# RBD benchmark: sluice (perf, NBD export) beside qemu-storage-daemon's rbd
# driver and `rbd bench` on one throwaway cluster; then a stream from RBD.
# See scripts/bench/rbd.py for what is measured and how.
#   RUNTIME=5 ROUNDS=2 SLUICE_BIN=target/release/sluice scripts/bench/rbd.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" scripts/bench/rbd.py "$@"
