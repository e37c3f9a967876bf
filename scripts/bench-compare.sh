#!/usr/bin/env bash
# Compares loadgen binaries (say, builds of two commits) on the rows the
# performance goals name, interleaved so that a noisy machine affects them
# alike, and prints the medians as a markdown table on stdout.
#
#   scripts/bench-compare.sh OLD_LOADGEN NEW_LOADGEN
#   REPS=5 BENCH_SECONDS=3 scripts/bench-compare.sh a/loadgen b/loadgen
#
# Build a binary with `cargo build --release --all-features --example loadgen`
# and copy target/release/examples/loadgen away before building the next.
# The baseline rows (raw, prost) run with the first binary only.
set -euo pipefail

reps="${REPS:-3}"
seconds="${BENCH_SECONDS:-2}"
if [[ $# -lt 1 ]]; then
    echo "usage: $0 LOADGEN [LOADGEN ...]" >&2
    exit 2
fi
for bin in "$@"; do
    [[ -x "$bin" ]] || { echo "not an executable: $bin" >&2; exit 2; }
done
[[ "$reps" =~ ^[1-9][0-9]*$ ]] || { echo "REPS must be a positive integer" >&2; exit 2; }
[[ "$seconds" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "BENCH_SECONDS must be a number" >&2; exit 2; }
command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 2; }

rows=(
    "--baseline raw --mode stream --clients 1 --size 100"
    "--baseline prost --mode stream --clients 1 --size 100"
    "--backend tcp --auth none --mode stream --clients 1 --size 100"
    "--baseline raw --mode broadcast --clients 32 --size 100"
    "--baseline prost --mode broadcast --clients 32 --size 100"
    "--backend tcp --auth none --mode broadcast --clients 32 --size 100"
    "--baseline raw --mode rtt --clients 1 --size 100"
    "--baseline prost --mode rtt --clients 1 --size 100"
    "--backend tcp --auth none --mode rtt --clients 1 --size 100"
    "--backend tcp --auth signed --crypto libsecp256k1 --mode stream --clients 1 --size 100"
    "--backend tcp --auth signed --crypto libsecp256k1 --mode broadcast --clients 32 --size 100"
    "--backend grpc --auth none --mode stream --clients 1 --size 100"
    "--baseline raw --mode stream --clients 100 --size 100"
    "--baseline prost --mode stream --clients 100 --size 100"
    "--backend tcp --auth none --mode stream --clients 100 --size 100"
)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
results="$work/results.jsonl"
: >"$results"
# loadgen cuts itself off at --seconds + 10 s; this bound is only a backstop.
bound="$(python3 -c "import math; print(math.ceil($seconds) + 20)")"
for rep in $(seq "$reps"); do
    for row in "${rows[@]}"; do
        for bin in "$@"; do
            if [[ "$row" == --baseline* && "$bin" != "$1" ]]; then
                continue
            fi
            echo "[$rep/$reps] $bin $row" >&2
            # shellcheck disable=SC2086 # the row is a list of words
            if out="$(timeout "$bound" "$bin" $row --seconds "$seconds" 2>>"$work/stderr.log" | tail -n 1)"; then
                printf '{"bin": "%s", "row": "%s", "result": %s}\n' "$bin" "$row" "$out" >>"$results"
            else
                echo "  failed (see loadgen's log below)" >&2
                tail -n 5 "$work/stderr.log" >&2
            fi
        done
    done
done

python3 - "$results" "$reps" "$@" <<'PY'
import collections, json, statistics, sys

path, reps, bins = sys.argv[1], sys.argv[2], sys.argv[3:]
runs = collections.defaultdict(list)
order = []
for line in open(path):
    entry = json.loads(line)
    key = (entry["row"], entry["bin"])
    if key not in runs:
        order.append(key)
    runs[key].append(entry["result"])

print(f"loadgen medians of {reps} interleaved run(s); binaries: " + ", ".join(f"`{b}`" for b in bins))
print()
print("| row | binary | msgs/s | p50 µs | max RSS (MB) | runs |")
print("|---|---|--:|--:|--:|--:|")
for row, binary in order:
    results = runs[(row, binary)]
    median = lambda field: statistics.median(r[field] for r in results)
    print(
        f"| `{row}` | `{binary}` | {median('msgs_per_sec'):,.0f} | {median('p50_us'):,.1f} "
        f"| {median('max_rss_kb') / 1024:.1f} | {len(results)} |"
    )
PY
