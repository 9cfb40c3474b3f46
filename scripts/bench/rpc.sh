#!/usr/bin/env bash
# RPC benchmark: round-trip latency of 1,000 sequential small RPCs, RPCs per
# second from 8 clients, and 1,000 bdevs created by a script.
#
#   scripts/bench/rpc.sh [--debug] [extra rpc_bench.py options]
#
# Builds the release binary (unless --debug), starts `sluice serve -m 0x1` on a
# private runtime directory, runs scripts/bench/rpc_bench.py with the test venv
# (made by scripts/test.sh), and stops the daemon.
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=release
if [ "${1:-}" = "--debug" ]; then profile=debug; shift; fi
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import spdk' 2>/dev/null; then
  echo "no .venv with the spdk package: run scripts/test.sh first" >&2
  exit 1
fi
if [ "$profile" = release ]; then
  cargo build --release -p sluice --bin sluice
else
  cargo build -p sluice --bin sluice
fi
bin="target/$profile/sluice"
dir=$(mktemp -d /tmp/sluice-bench.XXXXXX)
"$bin" serve --runtime-dir "$dir" -m "${SLUICE_BENCH_MASK:-0x1}" --rpc-max-connections 64 2>"$dir/log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 200); do [ -S "$dir/sluice.sock" ] && break; sleep 0.05; done
[ -S "$dir/sluice.sock" ] || { cat "$dir/log" >&2; exit 1; }
echo "sluice ($profile) pid $pid on $(nproc) CPUs; $(uname -r)"
.venv/bin/python scripts/bench/rpc_bench.py --rpc "$dir/sluice.sock" "$@"
