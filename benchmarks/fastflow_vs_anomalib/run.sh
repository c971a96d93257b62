#!/usr/bin/env bash
# vigil's FastFlow against anomalib 2.7's FastFlow on the 12 PIPED classes, side by side: MobileNetV2
# features.3 + features.6 + features.13 (strides 4, 8, 16) with the same local weights behind the
# trainable per-scale LayerNorm([C, H, W]), 128 px, 8 flow steps per scale (3x3 / 1x1 alternating),
# Adam 1e-3 / weight decay 1e-5, 40 epochs in batches of 8 on all 32 train/good images, seed 0.
# Both tools write their maps in one layout and one Python function computes image AUROC, pixel
# AUROC and the exact MVTec AUPRO@0.3 for both.
#
#   benchmarks/fastflow_vs_anomalib/run.sh [out folder] [vigil settings JSON] [epochs]
#                                                           (from the workspace root)
#
# The vigil settings default to '{}' (the CPU preset, whose epochs are 40); pass the same epochs as
# the third argument when overriding them. anomalib comes from $VIGIL_PEER_VENV (default:
# .peer-venv in the workspace), installed by ../shared/peers/install.sh when it is missing.
# PyTorch runs on ONE thread: on a loaded shared machine its OpenMP threads spin and two of them ran
# 30x slower than one (85 s against 2.8 s for 2 epochs); vigil runs on 2 (RAYON_NUM_THREADS=2).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-runs/fastflow-vs-anomalib}"
SETTINGS="${2:-{\}}"
EPOCHS="${3:-40}"
DATA=../shared/data/piped
VENV="${VIGIL_PEER_VENV:-$PWD/.peer-venv}"
if ! "$VENV/bin/python" -c "import anomalib" 2>/dev/null; then
  bash ../shared/peers/install.sh "$VENV"
fi
BIN="${VIGIL_METHOD_MAPS:-./target/release/examples/method_maps}"
[ -n "${VIGIL_BENCH_SKIP_BUILD:-}" ] || cargo build --release -p vigil-bench --example method_maps
CORES=$(nproc --all)
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=1 VIGIL_NO_PROGRESS=1
SCRIPT=benchmarks/fastflow_vs_anomalib/fastflow_side_by_side.py
mkdir -p "$OUT"
rm -f "$OUT/vigil.jsonl" "$OUT/anomalib.jsonl"
echo "machine: $CORES cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load before: $(cut -d' ' -f1-3 /proc/loadavg); vigil settings $SETTINGS; epochs $EPOCHS"
for class in "$DATA"/*/; do
  name=$(basename "$class")
  "$BIN" fastflow "$class" "$OUT/vigil/$name" "$SETTINGS" >/dev/null
  "$VENV/bin/python" "$SCRIPT" anomalib --class "$class" --out "$OUT/anomalib/$name" --epochs "$EPOCHS" --threads 1 >/dev/null
  for tool in vigil anomalib; do
    "$VENV/bin/python" "$SCRIPT" metrics --class "$class" --maps "$OUT/$tool/$name" >>"$OUT/$tool.jsonl"
  done
  echo "$name done $(date -u +%T); load $(cut -d' ' -f1 /proc/loadavg)"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
keys = ["image_auroc", "pixel_auroc", "aupro"]
rows = {tool: {r["class"]: r for r in map(json.loads, open(f"{out}/{tool}.jsonl"))} for tool in ["vigil", "anomalib"]}
print("| class | image AUROC vigil / anomalib | pixel AUROC vigil / anomalib | AUPRO@0.3 vigil / anomalib | fit s vigil / anomalib | s per image vigil / anomalib |")
print("|---|---|---|---|---|---|")
classes = sorted(set(rows["vigil"]) & set(rows["anomalib"]))
for c in classes:
    v, a = rows["vigil"][c], rows["anomalib"][c]
    print(f"| {c} | " + " | ".join(f"{v[k]:.4f} / {a[k]:.4f}" for k in keys)
          + f" | {v['fit_s']:.1f} / {a['fit_s']:.1f} | {v['score_s_per_image']:.3f} / {a['score_s_per_image']:.3f} |")
mean = lambda tool, k: sum(rows[tool][c][k] for c in classes) / len(classes)
print(f"| **mean ({len(classes)} classes)** | " + " | ".join(f"**{mean('vigil', k):.4f} / {mean('anomalib', k):.4f}**" for k in keys)
      + f" | {mean('vigil', 'fit_s'):.1f} / {mean('anomalib', 'fit_s'):.1f} | {mean('vigil', 'score_s_per_image'):.3f} / {mean('anomalib', 'score_s_per_image'):.3f} |")
PY
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%FT%TZ)"
