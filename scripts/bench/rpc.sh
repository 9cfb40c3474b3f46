#!/usr/bin/env bash
# RPC benchmark: round-trip latency of 1,000 sequential small RPCs, RPCs per
# second from 8 clients, and 1,000 bdevs created by a script; then QMP
# round trips (query-version) against qemu-storage-daemon's QMP monitor in
# the same run, alternating who goes first, with the ratio.
#
#   scripts/bench/rpc.sh [--debug] [extra rpc_bench.py options]
#
# Builds the release binary (unless --debug or SLUICE is set), starts `sluice
# serve -m 0x1` and qemu-storage-daemon (defaults; aio does not touch its
# monitor) on a private runtime directory, runs scripts/bench/rpc_bench.py
# with the test venv (made by scripts/test.sh), and stops both. The SPDK
# JSON-RPC figures have no peer here (QSD has no SPDK methods and spdk_tgt
# cannot run on this machine: its 8 ms is a reference figure from issue 5).
# No I/O: no cache to drop; each bulk step checks the bdev count it made.
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=release
if [ "${1:-}" = "--debug" ]; then profile=debug; shift; fi
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import spdk' 2>/dev/null; then
  echo "no .venv with the spdk package: run scripts/test.sh first" >&2
  exit 1
fi
if [ -n "${SLUICE:-}" ]; then
  bin=$SLUICE
elif [ "$profile" = release ]; then
  cargo build --release -p sluice --bin sluice
  bin="target/$profile/sluice"
else
  cargo build -p sluice --bin sluice
  bin="target/$profile/sluice"
fi
dir=$(mktemp -d /tmp/sluice-bench.XXXXXX)
"$bin" serve --runtime-dir "$dir" -m "${SLUICE_BENCH_MASK:-0x1}" --rpc-max-connections 64 2>"$dir/log" &
pid=$!
qemu-storage-daemon --chardev "socket,id=m0,path=$dir/qsd-qmp.sock,server=on,wait=off" --monitor chardev=m0 \
  >/dev/null 2>&1 &
qpid=$!
trap 'kill $pid $qpid 2>/dev/null; wait $pid $qpid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 200); do [ -S "$dir/sluice.sock" ] && break; sleep 0.05; done
[ -S "$dir/sluice.sock" ] || { cat "$dir/log" >&2; exit 1; }
for _ in $(seq 200); do [ -S "$dir/qsd-qmp.sock" ] && break; sleep 0.05; done
echo "sluice ($bin) pid $pid on $(nproc) CPUs; $(uname -r); load $(cut -d' ' -f1-3 /proc/loadavg)"
.venv/bin/python scripts/bench/rpc_bench.py --rpc "$dir/sluice.sock" --qmp "$dir/sluice-qmp.sock" \
  --qsd-qmp "$dir/qsd-qmp.sock" "$@"
