#!/usr/bin/env bash
# vigil (burn, flex backend) vs PyTorch (CPU) on the identical DRAEM networks, same machine,
# same run, 2 threads each: one training step (batch 8) and inference of one image, at 128 and
# 256 px, for the paper (official) and CPU presets. Prints a markdown table with the ratios.
#
#   benchmarks/draem_vs_torch/run.sh [reps]        (from the workspace root)
#
# PyTorch comes from $VIGIL_TORCH_VENV (default: .peer-venv in the workspace); if that has no
# torch, a venv is created there with the CPU wheel from download.pytorch.org.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPS="${1:-3}"
VENV="${VIGIL_TORCH_VENV:-$PWD/.peer-venv}"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --index-url https://download.pytorch.org/whl/cpu torch
fi
# Set VIGIL_BENCH_SKIP_BUILD=1 to reuse an already built example (cargo may wait on a busy target dir).
[ -n "${VIGIL_BENCH_SKIP_BUILD:-}" ] || cargo build --release -p vigil-draem --example bench_draem
export RAYON_NUM_THREADS=2 VIGIL_BENCH_THREADS=2 OMP_NUM_THREADS=2 VIGIL_NO_PROGRESS=1
echo "| preset | variant | px | params | train vigil ms | train torch ms | ratio | infer vigil ms | infer torch ms | ratio |"
echo "|---|---|---|---|---|---|---|---|---|---|"
# VIGIL_BENCH_CONFIGS="cpu draem 128;paper draem 256" runs a subset.
IFS=';' read -r -a CONFIGS <<< "${VIGIL_BENCH_CONFIGS:-cpu draem 128;cpu draem 256;cpu unetpp 128;cpu unetpp 256;paper draem 128;paper draem 256}"
for cfg in "${CONFIGS[@]}"; do
  set -- $cfg
  # Paper-size training steps take a minute or more on 2 cores: one timed repetition there
  # (after the untimed warm-up), unless VIGIL_BENCH_PAPER_REPS says otherwise.
  reps="$REPS"; [ "$1" = paper ] && reps="${VIGIL_BENCH_PAPER_REPS:-1}"
  v=$(./target/release/examples/bench_draem "$1" "$2" "$3" "$reps")
  t=$("$VENV/bin/python" benchmarks/draem_vs_torch/draem_torch.py "$1" "$2" "$3" "$reps")
  python3 - "$v" "$t" <<'PY'
import json, sys
v, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert v["params"] == t["params"], f"architectures differ: {v['params']} vs {t['params']} values"
print(f"| {v['preset']} | {v['variant']} | {v['size']} | {v['params']} | {v['train_ms']:.0f} | {t['train_ms']:.0f} | "
      f"{v['train_ms'] / t['train_ms']:.2f} | {v['infer_ms']:.1f} | {t['infer_ms']:.1f} | {v['infer_ms'] / t['infer_ms']:.2f} |")
PY
done
