#!/usr/bin/env bash
# vigil's STFPM and Reverse Distillation against anomalib 2.7's, side by side: the same teacher / encoder
# (MobileNetV2 features.3/.6/.13 or EfficientNet-Lite0 _blocks.2/.4/.10, the shared ImageNet weights),
# 128 px, batches of 8 on all train/good images, the same epochs, seed 0. STFPM: a student of the same
# architecture from random initialisation, SGD lr 0.4 / momentum 0.9 / weight decay 1e-3. Reverse
# Distillation: anomalib's OCBE bottleneck and basic-block ResNet decoder at the encoder taps' widths,
# Adam lr 0.005 / betas (0.5, 0.99). Both tools write their maps in one layout and one Python function
# computes image AUROC, pixel AUROC, AUPRO@0.3 and pixel AP for both; each table ends with the quality
# differences and the speed ratios (anomalib time / vigil time: above 1 means vigil is faster).
#
#   benchmarks/students_vs_anomalib/run.sh [out folder] [classes: all | A,B,...] [epochs] [backbones] [methods]
#                                                     (from the workspace root)
#
# Defaults: runs/students-vs-anomalib, all 12 PIPED classes, 40 epochs (vigil's cpu presets),
# "mobilenet_v2 efficientnet_lite0", "stfpm reverse_distillation". PyTorch runs on $TORCH_THREADS threads (default 2), vigil on
# $RAYON_NUM_THREADS (default 2). anomalib comes from $VIGIL_PEER_VENV (default: .peer-venv in the
# workspace), installed by ../shared/peers/install.sh when missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-runs/students-vs-anomalib}"
CLASSES="${2:-all}"
EPOCHS="${3:-40}"
BACKBONES="${4:-mobilenet_v2 efficientnet_lite0}"
METHODS="${5:-stfpm reverse_distillation}"
DATA=../shared/data/piped
VENV="${VIGIL_PEER_VENV:-$PWD/.peer-venv}"
if ! "$VENV/bin/python" -c "import anomalib" 2>/dev/null; then
  bash ../shared/peers/install.sh "$VENV"
fi
BIN="${VIGIL_METHOD_MAPS:-./target/release/examples/method_maps}"
[ -n "${VIGIL_BENCH_SKIP_BUILD:-}" ] || cargo build --release -p vigil-bench --example method_maps
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}" VIGIL_NO_PROGRESS=1
TORCH_THREADS="${TORCH_THREADS:-2}"
export OMP_NUM_THREADS="$TORCH_THREADS"
SCRIPT=benchmarks/students_vs_anomalib/students_side_by_side.py
if [ "$CLASSES" = all ]; then
  CLASSES=$(cd "$DATA" && for d in */; do printf '%s,' "${d%/}"; done)
fi
mkdir -p "$OUT"
echo "machine: $(nproc --all) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load before: $(cut -d' ' -f1-3 /proc/loadavg); epochs $EPOCHS; vigil threads $RAYON_NUM_THREADS, torch threads $TORCH_THREADS; $(date -u +%FT%TZ)"
for method in $METHODS; do
for backbone in $BACKBONES; do
  kebab=${backbone//_/-}
  run="$method/$backbone"
  rm -f "$OUT/$run.vigil.jsonl" "$OUT/$run.anomalib.jsonl"
  for name in ${CLASSES//,/ }; do
    class="$DATA/$name"
    "$BIN" "$method" "$class" "$OUT/$run/vigil/$name" "{\"backbone\":\"$kebab\",\"epochs\":$EPOCHS}" >/dev/null
    "$VENV/bin/python" "$SCRIPT" anomalib --method "$method" --class "$class" --out "$OUT/$run/anomalib/$name" \
      --backbone "$backbone" --epochs "$EPOCHS" --threads "$TORCH_THREADS" >/dev/null
    for tool in vigil anomalib; do
      "$VENV/bin/python" "$SCRIPT" metrics --class "$class" --maps "$OUT/$run/$tool/$name" >>"$OUT/$run.$tool.jsonl"
    done
    echo "$method $backbone $name done $(date -u +%T); load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
done
python3 - "$OUT" "$EPOCHS" "$METHODS" $BACKBONES <<'PY'
import json, sys
out, epochs, methods, backbones = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]
keys = ["image_auroc", "pixel_auroc", "aupro", "pixel_ap"]
titles = {"stfpm": "STFPM", "reverse_distillation": "Reverse Distillation"}
for method, backbone in ((m, b) for m in methods for b in backbones):
    run = f"{method}/{backbone}"
    rows = {tool: {r["class"]: r for r in map(json.loads, open(f"{out}/{run}.{tool}.jsonl"))}
            for tool in ["vigil", "anomalib"]}
    classes = sorted(set(rows["vigil"]) & set(rows["anomalib"]))
    print(f"\n### {titles.get(method, method)}, {backbone} teacher, {epochs} epochs (vigil / anomalib)\n")
    print("| class | image AUROC | pixel AUROC | AUPRO@0.3 | pixel AP | epoch s | s per image |")
    print("|---|---|---|---|---|---|---|")
    for c in classes:
        v, a = rows["vigil"][c], rows["anomalib"][c]
        print(f"| {c} | " + " | ".join(f"{v[k]:.4f} / {a[k]:.4f}" for k in keys)
              + f" | {v['fit_s'] / epochs:.2f} / {a['fit_s'] / epochs:.2f}"
              + f" | {v['score_s_per_image']:.4f} / {a['score_s_per_image']:.4f} |")
    mean = lambda tool, k: sum(rows[tool][c][k] for c in classes) / len(classes)
    print(f"| **mean ({len(classes)} classes)** | "
          + " | ".join(f"**{mean('vigil', k):.4f} / {mean('anomalib', k):.4f}**" for k in keys)
          + f" | {mean('vigil', 'fit_s') / epochs:.2f} / {mean('anomalib', 'fit_s') / epochs:.2f}"
          + f" | {mean('vigil', 'score_s_per_image'):.4f} / {mean('anomalib', 'score_s_per_image'):.4f} |")
    diffs = ", ".join(f"{k} {mean('vigil', k) - mean('anomalib', k):+.4f}" for k in keys)
    train_ratio = mean("anomalib", "fit_s") / mean("vigil", "fit_s")
    infer_ratio = mean("anomalib", "score_s_per_image") / mean("vigil", "score_s_per_image")
    print(f"\nvigil minus anomalib (means): {diffs}")
    print(f"speed, anomalib time / vigil time (above 1: vigil faster): training {train_ratio:.2f}x "
          f"(target >= 1), inference at batch 1 {infer_ratio:.2f}x (target >= 2)")
PY
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%FT%TZ)"
