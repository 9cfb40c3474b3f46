#!/usr/bin/env bash
# Builds the fuzz targets (fuzz/, a workspace of its own) and runs each for a
# bounded time against its committed corpus (fuzz/corpus/<target>/); fails on
# any crash, hang (-timeout) or memory blow-up (-rss_limit_mb).
#
#   scripts/fuzz.sh                 every target, FUZZ_SECONDS (20) each
#   SLUICE_SOAK=1 scripts/fuzz.sh   every target, at least FUZZ_RUNS (100000) inputs
#   scripts/fuzz.sh qmp_json ...    only these targets
#   FUZZ_MERGE=1 scripts/fuzz.sh    also merge new coverage into the corpus (-merge=1)
#
# Stable Rust only: libFuzzer comes from the libfuzzer-sys crate (built with
# the C++ compiler), the coverage instrumentation from rustc's stable flags
# (-C passes=sancov-module and LLVM's sanitizer-coverage options), the same
# instrumentation `cargo fuzz build -s none` asks for, without cargo-fuzz or
# a nightly toolchain. No sanitizer: the code under test is safe Rust (the
# unsafe modules are proved elsewhere), so a bug shows as a panic (libFuzzer
# aborts on it) or a hang; overflow checks and debug assertions are on.
# Crash inputs are left in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
all=(qcow2_header qcow2_tables qcow2_image nbd_server nbd_client rpc_framing qmp_json vhost_user vublk_virtqueue)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
triple=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="${RUSTFLAGS:-} -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks --cfg fuzzing"
# --target keeps the flags off build scripts and proc macros.
cargo build --release --target "$triple" --bins
bin="target/$triple/release"
soak=${SLUICE_SOAK:-0}
secs=${FUZZ_SECONDS:-20}
runs=${FUZZ_RUNS:-100000}
failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  work=$(mktemp -d)
  if [ "$soak" != 0 ] && [ "$soak" != "" ]; then limit=(-runs="$runs"); else limit=(-max_total_time="$secs"); fi
  echo "== $t: ${limit[*]}"
  if ! "$bin/$t" "$work" "corpus/$t" "${limit[@]}" -timeout=10 -rss_limit_mb=2048 \
      -max_len=65536 -artifact_prefix="artifacts/$t/" -print_final_stats=1 2>"$work.log"; then
    tail -40 "$work.log"
    failed+=("$t")
  fi
  grep -E "^stat::number_of_executed_units|^stat::new_units_added|^stat::peak_rss_mb" "$work.log" | sed "s/^/   $t /"
  if [ "${FUZZ_MERGE:-0}" = 1 ]; then
    "$bin/$t" -merge=1 "corpus/$t" "$work" -timeout=10 -rss_limit_mb=2048 -max_len=65536 2>/dev/null
  fi
  rm -rf "$work" "$work.log"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing found failures in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzzing: ${#targets[@]} targets clean"
