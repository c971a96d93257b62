#!/usr/bin/env bash
# End-to-end throughput (issue #9): the wall time per image of `vigil test` and `vigil predict`
# against the method's own scoring time (Model::score in a loop over decoded images, after
# warm-up), PatchCore (MobileNetV2 features, default settings) on N generated 800x600 PNG images.
# Each figure is the median of REPS runs; the ratios are wall time per image / scoring time.
#
#   benchmarks/throughput/run.sh [N test images, default 40] [REPS, default 3]   (from the workspace root)
#
# VIGIL_BIN: the vigil binary to time (default: a copy of target/release/vigil, built first);
# VIGIL_BENCH_SKIP_BUILD=1 skips the build. Threads: RAYON_NUM_THREADS (default 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
N="${1:-40}"
REPS="${2:-3}"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}" VIGIL_NO_PROGRESS=1
export VIGIL_WEIGHTS_DIR="${VIGIL_WEIGHTS_DIR:-$PWD/../shared/weights}"
if [ -z "${VIGIL_BENCH_SKIP_BUILD:-}" ]; then
  cargo build --release -p vigil-cli
  cargo build --release -p vigil-bench --example throughput
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# Copies, so that another build during the run does not change what is timed.
cp "${VIGIL_BIN:-target/release/vigil}" "$WORK/vigil"
cp "${THROUGHPUT_EXAMPLE:-target/release/examples/throughput}" "$WORK/throughput"
"$WORK/throughput" make-data --out "$WORK/data" --n "$N" --texture ../shared/data/textures/dtd/braided/braided_0002.jpg >/dev/null
"$WORK/vigil" fit -m patchcore --train "$WORK/data" -o "$WORK/model.vigil" >/dev/null 2>&1

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# Wall seconds of a command, whole process (start-up, model loading and final outputs included).
wall() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>"$WORK/stderr" || { cat "$WORK/stderr"; exit 1; }; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), RAYON_NUM_THREADS=$RAYON_NUM_THREADS; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
score=(); test=(); predict=()
for rep in $(seq "$REPS"); do
  score+=("$("$WORK/throughput" score-time --model "$WORK/model.vigil" --data "$WORK/data" | awk '{ print $2 }')")
  rm -rf "$WORK/test" "$WORK/predict"
  test+=("$(wall "$WORK/vigil" test --model "$WORK/model.vigil" --data "$WORK/data" -o "$WORK/test")")
  predict+=("$(wall "$WORK/vigil" predict --model "$WORK/model.vigil" "$WORK/data/test" -o "$WORK/predict")")
done
s=$(printf '%s\n' "${score[@]}" | median)
t=$(printf '%s\n' "${test[@]}" | median)
p=$(printf '%s\n' "${predict[@]}" | median)
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%FT%TZ); $N images of 800x600, median of $REPS"
echo "scoring ms/image: ${score[*]}; test s: ${test[*]}; predict s: ${predict[*]}"
echo
echo "| images | method scoring (Model::score) | vigil test, wall per image | test / scoring | vigil predict, wall per image | predict / scoring |"
echo "|---|---|---|---|---|---|"
awk -v n="$N" -v s="$s" -v t="$t" -v p="$p" 'BEGIN {
  tm = t * 1000 / n; pm = p * 1000 / n
  printf "| %d | %.1f ms | %.1f ms | %.2fx | %.1f ms | %.2fx |\n", n, s, tm, tm / s, pm, pm / s }'
