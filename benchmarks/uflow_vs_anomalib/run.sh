#!/usr/bin/env bash
# vigil's U-Flow against anomalib 2.7's U-Flow on the 12 PIPED classes, side by side: MobileNetV2
# features.6 + features.13 with the same local weights behind the trainable per-image
# LayerNorm([C, H, W]), 128 px, 4 flow steps per stage, 60 epochs in batches of 8 on all 32
# train/good images, seed 0. Both tools write their maps in one layout and one Python function
# computes image AUROC, pixel AUROC and the exact MVTec AUPRO@0.3 for both.
#
#   benchmarks/uflow_vs_anomalib/run.sh [out folder] [vigil settings JSON] [anomalib loss]
#                                                      (from the workspace root)
#
# The vigil settings default to '{}' (the CPU preset); the anomalib loss to `anomalib` (its
# UFlowLoss) or `official` (the per-sample loss of mtailanian/uflow). anomalib comes from
# $VIGIL_PEER_VENV (default: .peer-venv in the workspace), installed by ../shared/peers/install.sh
# when it is missing. anomalib's fit takes minutes per class on 2 cores; vigil's seconds.
#
# Beside it: seeds.sh (vigil over several seeds: the spread of the 12-class means) and the step-by-step
# trace (methods/uflow/examples/uflow_trace.rs, then `uflow_side_by_side.py trace`), see methods/uflow/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-runs/uflow-vs-anomalib}"
SETTINGS="${2:-{\}}"
LOSS="${3:-anomalib}"
DATA=../shared/data/piped
VENV="${VIGIL_PEER_VENV:-$PWD/.peer-venv}"
if ! "$VENV/bin/python" -c "import anomalib" 2>/dev/null; then
  bash ../shared/peers/install.sh "$VENV"
fi
[ -n "${VIGIL_BENCH_SKIP_BUILD:-}" ] || cargo build --release -p vigil-bench --example method_maps
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2 VIGIL_NO_PROGRESS=1
SCRIPT=benchmarks/uflow_vs_anomalib/uflow_side_by_side.py
mkdir -p "$OUT"
rm -f "$OUT/vigil.jsonl" "$OUT/anomalib-$LOSS.jsonl"
echo "machine: $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg); vigil settings $SETTINGS; anomalib loss $LOSS"
for class in "$DATA"/*/; do
  name=$(basename "$class")
  ./target/release/examples/method_maps uflow "$class" "$OUT/vigil/$name" "$SETTINGS" >/dev/null
  "$VENV/bin/python" "$SCRIPT" anomalib --class "$class" --out "$OUT/anomalib-$LOSS/$name" --loss "$LOSS" >/dev/null
  for tool in vigil "anomalib-$LOSS"; do
    "$VENV/bin/python" "$SCRIPT" metrics --class "$class" --maps "$OUT/$tool/$name" >>"$OUT/$tool.jsonl"
  done
done
python3 - "$OUT" "$LOSS" <<'PY'
import json, sys
out, loss = sys.argv[1], sys.argv[2]
keys = ["image_auroc", "pixel_auroc", "aupro"]
print("| tool | image AUROC | pixel AUROC | AUPRO@0.3 |\n|---|---:|---:|---:|")
for tool in ["vigil", f"anomalib-{loss}"]:
    rows = [json.loads(line) for line in open(f"{out}/{tool}.jsonl")]
    print(f"| {tool} ({len(rows)} classes) | " + " | ".join(f"{sum(r[k] for r in rows) / len(rows):.4f}" for k in keys) + " |")
PY
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%FT%TZ)"
