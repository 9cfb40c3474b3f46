#!/usr/bin/env bash
# The test command: sets up the Python venv with the real clients (spdk, qemu.qmp),
# builds the sluice binary, then runs every test in the workspace.
# SLUICE_SOAK=1 also runs the slow soak tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import spdk, qemu.qmp' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet spdk qemu-qmp
fi
cargo build --workspace --bins
cargo test --workspace --no-fail-fast -- --test-threads="${SLUICE_TEST_THREADS:-2}" "$@"
