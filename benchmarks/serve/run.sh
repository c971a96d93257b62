#!/usr/bin/env bash
# vigil serve under load (issue #18), against vigil predict on the same images in the same run. All
# traffic stays on 127.0.0.1; every request loop is bounded in count.
#
#   benchmarks/serve/run.sh [OUT]            (default OUT: runs/serve-bench; from anywhere)
#   env: REQUESTS  requests per concurrency level, and images of the vigil predict run (default 640)
#        SOAK      requests of the memory run at concurrency 8 (default 10000)
#        OVERLOAD  requests of the overload run (default 320)
#        ROUNDS    vigil predict runs, the best is kept (default 3)
#
# The model is the demo's (`vigil demo`: the a contrario detector with Gabor features fitted on
# data/demo/PA_BDP01_TL); the images are its 64 test images (128x128 PNG), cycled. Prints a
# markdown table (also in OUT/results.md): throughput (images/s) and p50/p99 latency at
# concurrency 1, 2, 8, 32 (the server with its defaults: one worker per core, a queue of 4 per
# worker, widened to 64 so that 32 clients wait instead of being turned away), against vigil
# predict's throughput on REQUESTS images (the 64 cycled, as the load client cycles them; its
# start-up and model load, timed on one image, taken out; it also writes a map, an overlay and a
# mask per image, which the service does not); the server's resident memory over SOAK requests
# (it fails if, after the first tenth, RSS trends up by more than 10 % of its mean); and an overload run (1 worker,
# queue 2, 32 clients) that must answer only 200 or 503, with some 503s.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/serve-bench}
REQUESTS=${REQUESTS:-640}
SOAK=${SOAK:-10000}
OVERLOAD=${OVERLOAD:-320}
ROUNDS=${ROUNDS:-3}
IMAGES=data/demo/PA_BDP01_TL/test
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export VIGIL_NO_PROGRESS=1
cargo build --release -p vigil-cli
cargo build --release -p vigil-serve --example load
# Copies, so that a rebuild during the run does not change the binaries measured.
cp target/release/vigil "$OUT/vigil"
cp target/release/examples/load "$OUT/load"
VIGIL=$OUT/vigil
LOAD=$OUT/load
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

"$VIGIL" demo -o "$OUT/demo" --overwrite >&2
MODEL=$OUT/demo/model.vigil

# vigil predict on the same images: REQUESTS of them (the 64 test images cycled, as links), and one
# image for the start-up and model load, which are taken out of its throughput.
mapfile -t sources < <(find "$PWD/$IMAGES" -type f -name '*.png' | sort)
rm -rf "$OUT/predict-images" "$OUT/one-image"
mkdir -p "$OUT/predict-images" "$OUT/one-image"
for i in $(seq 0 $((REQUESTS - 1))); do
    ln -s "${sources[i % ${#sources[@]}]}" "$OUT/predict-images/$(printf '%06d' "$i").png"
done
ln -s "${sources[0]}" "$OUT/one-image/0.png"
seconds() {
    local t0 t1
    t0=$(date +%s.%N)
    "$VIGIL" predict --model "$MODEL" "$1" -o "$OUT/predict" --overwrite >/dev/null
    t1=$(date +%s.%N)
    python3 -c "print($t1 - $t0)"
}
: >"$OUT/predict.txt"
for round in $(seq 1 "$ROUNDS"); do
    echo "$(seconds "$OUT/predict-images") $(seconds "$OUT/one-image")" >>"$OUT/predict.txt"
done

# Starts vigil serve on a free loopback port with extra flags; sets SERVER_PID and URL.
start_server() {
    "$VIGIL" serve --model "demo=$MODEL" --bind 127.0.0.1:0 "$@" >"$OUT/serve.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 300); do
        grep -q "http://" "$OUT/serve.log" && break
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    local addr
    addr=$(grep -o 'http://[0-9.:]*' "$OUT/serve.log" | head -1 || true)
    [ -n "$addr" ] || { echo "vigil serve did not start:" >&2; cat "$OUT/serve.log" >&2; exit 1; }
    URL="$addr/v1/models/demo/score"
}
stop_server() {
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID"
}
trap '[ -n "${SERVER_PID:-}" ] && kill -TERM "$SERVER_PID" 2>/dev/null || true' EXIT

: >"$OUT/load.jsonl"
start_server --queue 64
"$LOAD" --url "$URL" --images "$IMAGES" --concurrency 2 --requests 64 >/dev/null # warm-up
for c in 1 2 8 32; do
    "$LOAD" --url "$URL" --images "$IMAGES" --concurrency "$c" --requests "$REQUESTS" >>"$OUT/load.jsonl"
done
"$LOAD" --url "$URL" --images "$IMAGES" --concurrency 8 --requests "$SOAK" --pid "$SERVER_PID" >"$OUT/soak.json"
stop_server

start_server --workers 1 --queue 2
"$LOAD" --url "$URL" --images "$IMAGES" --concurrency 32 --requests "$OVERLOAD" >"$OUT/overload.json"
stop_server
SERVER_PID=
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%FT%TZ)" >&2

python3 - "$OUT" "$REQUESTS" <<'PY' | tee "$OUT/results.md"
import json, sys
out, n = sys.argv[1], int(sys.argv[2])
rounds = [tuple(map(float, l.split())) for l in open(f"{out}/predict.txt") if l.strip()]
# images/s of vigil predict without its start-up: (n - 1) images in the time beyond a one-image run
predict = max((n - 1) / (full - one) for full, one in rounds)
whole = max(n / full for full, _ in rounds)
print(f"vigil serve vs vigil predict: the demo model (a contrario, Gabor features, data/demo/PA_BDP01_TL), its 64 test images (128x128 PNG) cycled")
print(f"vigil predict on {n} images: {predict:.2f} images/s without start-up and model load ({whole:.2f} for the whole command); "
      f"best of {len(rounds)} runs; it also writes a map, an overlay and a mask per image\n")
print("| concurrency | images/s | vs predict | p50 ms | p99 ms | answers |")
print("|---:|---:|---:|---:|---:|---|")
for line in open(f"{out}/load.jsonl"):
    r = json.loads(line)
    answers = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
    print(f"| {r['concurrency']} | {r['ok_per_second']:.2f} | {r['ok_per_second'] / predict:.0%} | {r['p50_ms']:.1f} | "
          f"{r['p99_ms']:.1f} | {answers} |")
soak = json.load(open(f"{out}/soak.json"))
rss = soak["rss_kib"]
print(f"\nMemory over {soak['requests']} requests at concurrency 8 ({soak['ok_per_second']:.2f} images/s; answers {soak['statuses']}):")
print("requests done -> server RSS MiB: " + ", ".join(f"{d}: {k / 1024:.1f}" for d, k in rss))
failed = []
if len(rss) >= 4:
    # after the first tenth (warm-up: buffers and allocator arenas fill), the least-squares trend of
    # RSS against requests: a leak grows with the requests, a busy allocator only fluctuates
    pts = rss[1:]
    mx = sum(d for d, _ in pts) / len(pts)
    my = sum(k for _, k in pts) / len(pts)
    slope = sum((d - mx) * (k - my) for d, k in pts) / sum((d - mx) ** 2 for d, _ in pts)
    trend = slope * (pts[-1][0] - pts[0][0]) / my
    print(f"RSS after the first tenth {pts[0][1] / 1024:.1f} MiB, at the end {pts[-1][1] / 1024:.1f} MiB, between "
          f"{min(k for _, k in pts) / 1024:.1f} and {max(k for _, k in pts) / 1024:.1f} MiB; trend over the rest of the run "
          f"{trend:+.1%} of the mean ({slope * 1000 / 1024:+.2f} MiB per 1000 requests)")
    if trend > 0.10:
        failed.append(f"RSS trend {trend:+.1%} after the first tenth")
else:
    failed.append("too few RSS samples")
if set(soak["statuses"]) != {"200"}:
    failed.append(f"the memory run had answers other than 200: {soak['statuses']}")
over = json.load(open(f"{out}/overload.json"))
print(f"\nOverload (1 worker, queue 2, 32 clients, {over['requests']} requests): answers {over['statuses']}")
if set(over["statuses"]) - {"200", "503"} or "503" not in over["statuses"]:
    failed.append(f"overload answers {over['statuses']}: expected only 200 and 503, some 503")
for c in json.loads("[" + ",".join(open(f"{out}/load.jsonl")) + "]"):
    if set(c["statuses"]) != {"200"}:
        failed.append(f"concurrency {c['concurrency']}: answers {c['statuses']}")
if failed:
    print("\nFAILED: " + "; ".join(failed))
    sys.exit(1)
PY
