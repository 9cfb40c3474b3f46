#!/usr/bin/env bash
# CPU used by an idle `sluice serve` with two reactors over 10 s (goal: < 2% of one
# core in total). SPDK's spdk_tgt, for comparison, spins every reactor at 100%.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${SECS:-10}
cargo build --release --bin sluice -q
dir=$(mktemp -d /tmp/sluice-idle.XXXX)
./target/release/sluice serve -m 0x3 --runtime-dir "$dir" 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
sleep 1
hz=$(getconf CLK_TCK)
read -r u0 s0 < <(awk '{print $14, $15}' /proc/$pid/stat)
sleep "$secs"
read -r u1 s1 < <(awk '{print $14, $15}' /proc/$pid/stat)
awk -v d=$(( (u1 + s1) - (u0 + s0) )) -v hz="$hz" -v s="$secs" \
  'BEGIN { printf "idle sluice serve -m 0x3 over %d s: %.2f%% of one core (goal < 2%%)\n", s, d / hz / s * 100 }'
