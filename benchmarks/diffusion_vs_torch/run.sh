#!/usr/bin/env bash
# vigil (burn, flex backend, vigil-nn's training kernels) vs PyTorch (CPU) on the same DDAD
# U-Net, same machine, same run, the same number of threads each: one training step (Adam,
# DDAD's loss) and one DDAD reconstruction (10 conditioned DDIM steps, 1 image). Each config
# runs vigil, then PyTorch, then vigil and PyTorch again ... `rounds` times; the table shows each
# side's median over the rounds and the ratio of the medians (vigil / PyTorch: below 1 is vigil
# faster). The architectures must have the same parameter count or the script stops.
#
#   benchmarks/diffusion_vs_torch/run.sh [repeats] [rounds]     (from anywhere; defaults 3 and 3)
#
# Environment: VIGIL_BENCH_CONFIGS="cpu 8;cpu 32" (preset and training batch, ';'-separated;
# presets of crates/diffusion: cpu, ddad; ddad-s has dropout, which the PyTorch re-statement
# lacks), VIGIL_BENCH_THREADS (default 2), VIGIL_TORCH_VENV (default .peer-venv in the workspace,
# which must have torch), VIGIL_BENCH_SKIP_BUILD=1 to reuse the built example. The PyTorch network
# is crates/diffusion/tests/fixtures/make_golden_unet.py's re-statement of DDAD's unet.py (checked
# against the official one by that script; see crates/diffusion/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPEATS="${1:-3}"
ROUNDS="${2:-3}"
VENV="${VIGIL_TORCH_VENV:-$PWD/.peer-venv}"
THREADS="${VIGIL_BENCH_THREADS:-2}"
"$VENV/bin/python" -c "import torch" || { echo "no torch in $VENV (set VIGIL_TORCH_VENV)" >&2; exit 1; }
[ -n "${VIGIL_BENCH_SKIP_BUILD:-}" ] || cargo build --release -p vigil-diffusion --example time_unet
export RAYON_NUM_THREADS="$THREADS" VIGIL_BENCH_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc --all) cores; threads $THREADS; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| preset | batch | params | train vigil s | train torch s | ratio | reconstruction vigil s | reconstruction torch s | ratio |"
echo "|---|---|---|---|---|---|---|---|---|"
IFS=';' read -r -a CONFIGS <<< "${VIGIL_BENCH_CONFIGS:-cpu 8;cpu 32}"
for cfg in "${CONFIGS[@]}"; do
  read -r preset batch <<< "$cfg"
  results=()
  for _ in $(seq "$ROUNDS"); do
    results+=("$(./target/release/examples/time_unet "$preset" "$batch" "$REPEATS" 2>/dev/null)")
    results+=("$("$VENV/bin/python" crates/diffusion/bench/time_unet_torch.py "$preset" "$batch" "$REPEATS")")
  done
  python3 - "${results[@]}" <<'PY'
import json, statistics, sys
runs = [json.loads(r) for r in sys.argv[1:]]
vigil, torch = runs[0::2], runs[1::2]
assert vigil[0]["kernels"] == "vigil", "VIGIL_KERNELS is set to burn: these would not be vigil's kernels"
v_params, t_params = vigil[0]["parameters"], torch[0]["parameters"]
assert v_params == t_params, f"architectures differ: {v_params} vs {t_params} parameters"
median = lambda side, key: statistics.median(r[key] for r in side)
vt, tt = median(vigil, "train_step_s"), median(torch, "train_step_s")
vr, tr = median(vigil, "reconstruction_s"), median(torch, "reconstruction_s")
p = vigil[0]
print(f"| {p['preset']} | {p['batch']} | {v_params} | {vt:.3f} | {tt:.3f} | {vt / tt:.2f} | {vr:.3f} | {tr:.3f} | {vr / tr:.2f} |")
PY
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); medians of $ROUNDS alternating rounds, $REPEATS timed repeats each after one warm-up"
