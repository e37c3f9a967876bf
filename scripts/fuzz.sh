#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ one after the other, each for a bounded
# time, starting from the committed seeds, and fails if any target crashes.
#
# Usage: scripts/fuzz.sh [target...]          (default: every target)
#
# Environment:
#   FUZZ_SECONDS    run time per target, in seconds (default 60)
#   FUZZ_RSS_MB     libFuzzer memory limit per process (default 2048)
#   FUZZ_TIMEOUT    time limit per input, in seconds (default 30)
#   FUZZ_SANITIZER  cargo-fuzz sanitizer (default none: the crate has no unsafe
#                   code, and without ASan the signature-heavy targets run about
#                   twice as fast; use address to cover dependencies' unsafe code)
#
# Seeds in fuzz/corpus/<target>/ are copied into fuzz/scratch/corpus/<target>/
# (git-ignored), which libFuzzer grows and which later runs start from. Logs go
# to fuzz/scratch/logs/, crashing inputs to fuzz/artifacts/<target>/. Replay
# one with `cargo +nightly fuzz run <target> <file>`, then add it to
# tests/it/fuzz_regressions.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-60}
rss_mb=${FUZZ_RSS_MB:-2048}
timeout=${FUZZ_TIMEOUT:-30}
sanitizer=${FUZZ_SANITIZER:-none}

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

mkdir -p fuzz/scratch/logs
summary=fuzz/scratch/summary.txt
: >"$summary"
failed=()
for target in "${targets[@]}"; do
  corpus=fuzz/scratch/corpus/$target
  log=fuzz/scratch/logs/$target.log
  mkdir -p "$corpus"
  cp -n fuzz/corpus/"$target"/* "$corpus"/ 2>/dev/null || true
  echo "== $target: ${seconds}s (log: $log)"
  # Debug assertions and overflow checks on: an overflow is a finding too.
  status=0
  nice -n 19 cargo +nightly fuzz run --sanitizer "$sanitizer" --debug-assertions "$target" "$corpus" -- \
    -max_total_time="$seconds" -rss_limit_mb="$rss_mb" -timeout="$timeout" -print_final_stats=1 \
    >"$log" 2>&1 || status=$?

  # libFuzzer's last status line ("#N DONE cov: … ft: … corp: …") and final stats.
  last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  line="$target: exit $status, execs ${execs:-?}, ${rate:-?} exec/s, last: ${last:-none}"
  echo "$line" | tee -a "$summary"
  if [ "$status" -ne 0 ]; then
    failed+=("$target")
    artifacts=$(grep -oE 'Test unit written to [^ ]+' "$log" \
      | awk '{print $NF}' || true)
    if [ -n "$artifacts" ]; then
      echo "   crash artifact(s): $artifacts" | tee -a "$summary"
    else
      echo "   no artifact: see $log (build failure?)" | tee -a "$summary"
    fi
    grep -m 5 -E 'panicked at|ERROR: libFuzzer|SUMMARY:' "$log" | sed 's/^/   /' || true
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}" | tee -a "$summary"
  exit 1
fi
echo "all ${#targets[@]} targets ran ${seconds}s without a crash" | tee -a "$summary"
