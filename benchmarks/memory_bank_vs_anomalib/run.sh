#!/usr/bin/env bash
# vigil vs anomalib, PatchCore and PaDiM, side by side in one run on one machine: MobileNetV2
# features.6 + features.13 with the same local weights, 256 px, 2 threads each, one PIPED class.
# Fit on its 32 training images (median of 3) and batch-1 scoring latency (median of 20).
# Prints a markdown table with the ratios.
#
#   benchmarks/memory_bank_vs_anomalib/run.sh [class folder]     (from the workspace root)
#
# anomalib comes from $VIGIL_PEER_VENV (default: .peer-venv in the workspace), installed by
# ../shared/peers/install.sh when it is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
CLASS="${1:-../shared/data/piped/PA_BDP01_TL}"
VENV="${VIGIL_PEER_VENV:-$PWD/.peer-venv}"
if ! "$VENV/bin/python" -c "import anomalib" 2>/dev/null; then
  bash ../shared/peers/install.sh "$VENV"
fi
[ -n "${VIGIL_BENCH_SKIP_BUILD:-}" ] || cargo build --release -p vigil-bench --example memory_bank_speed
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2 VIGIL_NO_PROGRESS=1
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| method | fit 32 images: vigil / anomalib | fit ratio | batch-1 latency: vigil / anomalib | latency ratio | peak RSS: vigil / anomalib |"
echo "|---|---|---|---|---|---|"
for method in patchcore padim; do
  v=$(./target/release/examples/memory_bank_speed --method "$method" --class "$CLASS" --reps-fit 3 --reps 20)
  a=$("$VENV/bin/python" ../shared/peers/anomalib_bench.py speed --data "$CLASS" --model "$method" --threads 2 2>/dev/null)
  python3 - "$method" "$v" "$a" <<'PY'
import json, sys
method, v, a = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
vals = {line.split()[0]: float(line.split()[1]) for line in v.splitlines() if line.split()[1:2] and line.split()[1].replace('.', '', 1).isdigit()}
vf, vl, vr = vals["fit_s_median"], vals["infer_b1_ms_median"], vals["peak_rss_mb"]
af, al, ar = a["fit_s_median"], a["infer_b1_ms_median"], a["peak_rss_mb"]
print(f"| {method} | {vf:.2f} s / {af:.2f} s | {af / vf:.1f}x faster | {vl:.1f} ms / {al:.1f} ms | "
      f"{al / vl:.2f}x faster | {vr:.0f} MB / {ar:.0f} MB |")
PY
done
echo
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%FT%TZ)"
