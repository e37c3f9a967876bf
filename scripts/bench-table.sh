#!/usr/bin/env bash
# Runs the load generator (examples/loadgen.rs) over a fixed set of rows and
# prints a markdown table of the results on stdout (progress on stderr).
#
#   scripts/bench-table.sh                 # 3 s per row
#   BENCH_SECONDS=5 scripts/bench-table.sh
#
# Every row runs in its own process: a server and its clients on 127.0.0.1,
# on a tokio runtime of 2 worker threads. The raw rows are the reference: the
# same frames through a bare length-delimited TCP pipe in the same run. The
# prost rows add encoding and decoding each message to that pipe: what any
# transport handing over owned messages pays on top of raw.
set -euo pipefail

seconds="${BENCH_SECONDS:-3}"
if ! [[ "$seconds" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    echo "BENCH_SECONDS must be a number of seconds, got '$seconds'" >&2
    exit 2
fi
command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 2; }

cd "$(dirname "$0")/.."

echo "building loadgen (release, all features)…" >&2
# Ask cargo where the binary is rather than guess the target directory.
loadgen="$(
    cargo build --release --all-features --example loadgen --message-format=json-render-diagnostics |
        python3 -c '
import json, sys
path = None
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "loadgen" and msg.get("executable"):
        path = msg["executable"]
print(path or "")
'
)"
if [[ -z "$loadgen" || ! -x "$loadgen" ]]; then
    echo "could not find the loadgen binary" >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
results="$work/results.jsonl"
: >"$results"

# One row: loadgen's arguments (--seconds is added).
rows=(
    "--baseline raw --mode stream --clients 1 --size 100"
    "--baseline raw --mode rtt --clients 1 --size 100"
    "--baseline prost --mode stream --clients 1 --size 100"
    "--baseline prost --mode rtt --clients 1 --size 100"
    "--backend tcp --auth none --mode stream --clients 1 --size 100"
    "--backend tcp --auth handshake --crypto k256 --mode stream --clients 1 --size 100"
    "--backend tcp --auth signed --crypto k256 --mode stream --clients 1 --size 100"
    "--backend tcp --auth signed --crypto libsecp256k1 --mode stream --clients 1 --size 100"
    "--backend tcp --auth none --mode broadcast --clients 32 --size 100"
    "--backend tcp --auth signed --crypto libsecp256k1 --mode broadcast --clients 32 --size 100"
    "--backend tcp --auth none --mode rtt --clients 1 --size 100"
    "--backend tcp --auth signed --crypto libsecp256k1 --mode rtt --clients 1 --size 100"
    "--backend grpc --auth none --mode stream --clients 1 --size 100"
    "--backend grpc --auth none --mode rtt --clients 1 --size 100"
    "--backend quic --auth none --mode stream --clients 1 --size 100"
    "--backend quic --auth none --mode rtt --clients 1 --size 100"
    "--backend ws --auth none --mode stream --clients 1 --size 100"
    "--backend ws --auth none --mode rtt --clients 1 --size 100"
    "--backend tcp --tls --auth none --mode stream --clients 1 --size 100"
    "--baseline raw --mode stream --clients 1 --size 4096"
    "--backend tcp --auth signed --crypto libsecp256k1 --mode stream --clients 1 --size 4096"
)

# loadgen cuts itself off at --seconds + 10 s; this bound is only a backstop.
bound="$(python3 -c "import math; print(math.ceil($seconds) + 20)")"
n=0
for row in "${rows[@]}"; do
    n=$((n + 1))
    echo "[$n/${#rows[@]}] loadgen $row --seconds $seconds" >&2
    # shellcheck disable=SC2086 # the row is a list of words
    if out="$(timeout "$bound" "$loadgen" $row --seconds "$seconds" 2>>"$work/stderr.log")"; then
        status=0
    else
        status=$?
    fi
    line="$(printf '%s\n' "$out" | grep -m1 '^{' || true)"
    python3 - "$row" "$status" "$line" >>"$results" <<'PY'
import json, sys
row, status, line = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    result = json.loads(line) if line else {}
except ValueError:
    result = {}
result["args"] = row
result["exit"] = status
print(json.dumps(result))
PY
done

python3 - "$results" "$seconds" "$(date -u +%Y-%m-%d)" "$(nproc 2>/dev/null || echo '?')" <<'PY'
import json, sys

path, seconds, date, cpus = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
rows = [json.loads(line) for line in open(path) if line.strip()]

def num(value, digits=0):
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"

def us(value):
    if value is None:
        return "–"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"

# The raw row of the same mode and size is the reference of a row.
raw = {
    (r["mode"], r["size"]): r["msgs_per_sec"]
    for r in rows
    if r.get("backend") == "raw" and r.get("messages")
}

print(
    f"Table: loadgen, {date}, 2 cores (tokio runtime with 2 worker threads; "
    f"machine: {cpus} CPUs), server and clients in one process on 127.0.0.1, "
    f"{seconds} s per row. Latency: every 64th message (stream, broadcast) "
    f"or every round trip (rtt); \"vs raw\" compares msgs/s with the raw row "
    f"of the same mode and size."
)
print()
print("| back-end | auth | crypto | mode | clients | size (B) | msgs/s | MB/s | p50 µs | p99 µs | vs raw | max RSS (MB) |")
print("|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
for r in rows:
    if "backend" not in r:
        print(f"| failed: `{r['args']}` (exit {r['exit']}) | | | | | | | | | | | |")
        continue
    note = "" if r["exit"] == 0 else f" (exit {r['exit']})"
    reference = raw.get((r["mode"], r["size"]))
    ratio = (
        f"{r['msgs_per_sec'] / reference:.2f}×"
        if reference and r["backend"] != "raw"
        else "–"
    )
    rss = r.get("max_rss_kb")
    print(
        f"| {r['backend']}{note} | {r['auth']} | {r['crypto']} | {r['mode']} "
        f"| {r['clients']} | {r['size']} | {num(r['msgs_per_sec'])} "
        f"| {num(r['bytes_per_sec'] / 1e6, 1)} | {us(r['p50_us'])} | {us(r['p99_us'])} "
        f"| {ratio} | {num(rss / 1024 if rss else None, 1)} |"
    )
PY
