#!/usr/bin/env bash
# vigil's U-Flow on the 12 PIPED classes with several seeds (initial flow weights, permutations
# and batch order), same protocol as run.sh: the spread of the 12-class means is the yardstick
# for any difference between two single-seed runs.
#
#   benchmarks/uflow_vs_anomalib/seeds.sh <out folder> '<vigil settings JSON>' <seed> [<seed> ...]
#                                                      (from the workspace root)
#   optional: VIGIL_BLUR=<sigma> also scores every map after a Gaussian blur of that sigma.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="$1"; SETTINGS="$2"; shift 2
DATA=../shared/data/piped
VENV="${VIGIL_PEER_VENV:-$PWD/.peer-venv}"
[ -n "${VIGIL_BENCH_SKIP_BUILD:-}" ] || cargo build --release -p vigil-bench --example method_maps
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2 VIGIL_NO_PROGRESS=1
SCRIPT=benchmarks/uflow_vs_anomalib/uflow_side_by_side.py
BIN="${VIGIL_METHOD_MAPS:-./target/release/examples/method_maps}"
echo "machine: $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg); vigil settings $SETTINGS; seeds $*"
for seed in "$@"; do
  mkdir -p "$OUT/seed$seed"
  rm -f "$OUT/seed$seed.jsonl" "$OUT/seed$seed-blur.jsonl"
  for class in "$DATA"/*/; do
    name=$(basename "$class")
    "$BIN" uflow "$class" "$OUT/seed$seed/$name" "$SETTINGS" "$seed" >/dev/null
    "$VENV/bin/python" "$SCRIPT" metrics --class "$class" --maps "$OUT/seed$seed/$name" >>"$OUT/seed$seed.jsonl"
    if [ -n "${VIGIL_BLUR:-}" ]; then
      "$VENV/bin/python" "$SCRIPT" metrics --class "$class" --maps "$OUT/seed$seed/$name" --blur "$VIGIL_BLUR" \
        >>"$OUT/seed$seed-blur.jsonl"
    fi
  done
done
python3 - "$OUT" "$@" <<'PY'
import json, sys, statistics
out, seeds = sys.argv[1], sys.argv[2:]
keys = ["image_auroc", "pixel_auroc", "aupro"]
print("| run | image AUROC | pixel AUROC | AUPRO@0.3 |\n|---|---:|---:|---:|")
for suffix in ["", "-blur"]:
    means = []
    for seed in seeds:
        try:
            rows = [json.loads(line) for line in open(f"{out}/seed{seed}{suffix}.jsonl")]
        except FileNotFoundError:
            continue
        m = [sum(r[k] for r in rows) / len(rows) for k in keys]
        means.append(m)
        print(f"| seed {seed}{suffix} ({len(rows)} classes) | " + " | ".join(f"{v:.4f}" for v in m) + " |")
    if len(means) > 1:
        print(f"| mean ± sd over {len(means)} seeds{suffix} | " + " | ".join(
            f"{statistics.mean(c):.4f} ± {statistics.stdev(c):.4f}" for c in zip(*means)) + " |")
PY
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%FT%TZ)"
