#!/usr/bin/env bash
# vigil on Ray (issue #19): images per second against the number of scoring actors (1, 2, 4) with
# vigil.ray.VigilScorer, what one image costs an actor, and anomalib 2.7's batch inference of the
# same model family (PaDiM or PatchCore, MobileNetV2 features.6 + features.13 from the same local
# weights, 256 px) on the same images, in one run on one machine.
#
#   benchmarks/ray_scale/run.sh [OUT]              (default OUT: runs/ray-scale)
#   env: N        images scored (default 768: the test images of the 12 PIPED classes, sorted)
#        METHOD   padim (default) or patchcore: vigil's preset and anomalib's model
#        CLASS    the class both fit on (default ../shared/data/piped/PA_BDP01_TL)
#        ACTORS   actor counts (default 1,2,4)      ROUNDS  timed rounds each (default 3)
#        BATCH    images per batch (default 32)
#        PY_VENV  venv with ray (default target/py-venv, as .ci/run makes it; made if missing); the
#                 vigil package is installed into it from this tree (pip install ./crates/py) each run
#        VIGIL_PEER_VENV  anomalib's venv (default .peer-venv; ../shared/peers/install.sh makes it)
#        SKIP_ANOMALIB=1  leaves the peer out
#
# Prints a markdown table. Every Ray round's scores must equal `vigil predict`'s on the same list
# (the script fails otherwise). Scratch and results in OUT (results.md, *.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/ray-scale}
N=${N:-768}
METHOD=${METHOD:-padim}
CLASS=${CLASS:-../shared/data/piped/PA_BDP01_TL}
ACTORS=${ACTORS:-1,2,4}
ROUNDS=${ROUNDS:-3}
BATCH=${BATCH:-32}
PY_VENV=${PY_VENV:-$PWD/target/py-venv}
PEER_VENV=${VIGIL_PEER_VENV:-$PWD/.peer-venv}
PIPED=../shared/data/piped
case "$METHOD" in padim | patchcore) ;; *) echo "METHOD=$METHOD: padim or patchcore" >&2; exit 2 ;; esac
[ -d "$CLASS/train/good" ] || { echo "$CLASS: no train/good folder (CLASS must be an MVTec-layout class)" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export VIGIL_NO_PROGRESS=1

cargo build --release -p vigil-cli
cp target/release/vigil "$OUT/vigil"
VIGIL=$OUT/vigil
if ! "$PY_VENV/bin/python" -c "import ray.data, pyarrow, pandas" 2>/dev/null; then
    python3 -m venv "$PY_VENV"
    "$PY_VENV/bin/pip" install -q --disable-pip-version-check numpy pyarrow "pandas<3" "ray[data]>=2.9,<3"
fi
"$PY_VENV/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps ./crates/py
export RAY_USAGE_STATS_ENABLED=0
if [ -z "${SKIP_ANOMALIB:-}" ] && ! "$PEER_VENV/bin/python" -c "import anomalib" 2>/dev/null; then
    bash ../shared/peers/install.sh "$PEER_VENV"
fi

# The images: the first N of the sorted PIPED test images, as links in one folder (anomalib's
# PredictDataset reads a folder), listed in that order for vigil.
rm -rf "$OUT/images"
mkdir -p "$OUT/images"
find "$(cd "$PIPED" && pwd)" -path '*/test/*' -type f -name '*.png' | sort | head -n "$N" >"$OUT/sources.txt"
[ -s "$OUT/sources.txt" ] || { echo "$PIPED: no test images" >&2; exit 1; }
i=0
: >"$OUT/list.txt"
while read -r src; do
    link=$OUT/images/$(printf '%05d' "$i")_$(basename "$src")
    ln -s "$src" "$link"
    echo "$link" >>"$OUT/list.txt"
    i=$((i + 1))
done <"$OUT/sources.txt"
n_images=$i
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

rm -f "$OUT/model.vigil"
"$VIGIL" fit -m "$METHOD" --train "$CLASS" -o "$OUT/model.vigil" >&2
# The reference scores (and a one-process reference: vigil predict on all cores, which also writes
# every map, overlay and mask).
start=$(date +%s.%N)
"$VIGIL" predict --model "$OUT/model.vigil" --list "$OUT/list.txt" -o "$OUT/predict" --overwrite >/dev/null
end=$(date +%s.%N)
echo "{\"kind\": \"predict\", \"images\": $n_images, \"seconds\": $(python3 -c "print($end - $start)")}" >"$OUT/predict.json"

PY=$PY_VENV/bin/python
for t in 1 2; do
    "$PY" benchmarks/ray_scale/ray_scale.py plain --model "$OUT/model.vigil" --list "$OUT/list.txt" \
        --threads "$t" --rounds "$ROUNDS" --batch-size "$BATCH" >"$OUT/plain-$t.json"
done
"$PY" benchmarks/ray_scale/ray_scale.py ray --model "$OUT/model.vigil" --list "$OUT/list.txt" \
    --out "$OUT/ray-scratch" --actors "$ACTORS" --rounds "$ROUNDS" --batch-size "$BATCH" \
    --check "$OUT/predict/scores.csv" >"$OUT/ray.json"
rm -f "$OUT"/anomalib-*.json
if [ -z "${SKIP_ANOMALIB:-}" ]; then
    for t in 1 2; do
        "$PEER_VENV/bin/python" benchmarks/ray_scale/anomalib_batch.py --train "$CLASS" --images "$OUT/images" \
            --model "$METHOD" --threads "$t" --rounds "$ROUNDS" --batch-size "$BATCH" >"$OUT/anomalib-$t.json"
    done
fi
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%FT%TZ)" >&2

python3 - "$OUT" "$METHOD" "$CLASS" <<'PY' | tee "$OUT/results.md"
import glob, json, os, sys
out, method, klass = sys.argv[1:]
load = lambda p: json.load(open(p))
ray = load(f"{out}/ray.json")
n = ray["images"]
print(f"{n} PIPED test images (128x128 PNG), {method} (MobileNetV2 features.6 + features.13, 256 px) fitted on "
      f"{os.path.basename(klass)}; batches of {ray['batch_size']}; medians of {len(ray['runs']) // len(ray['summary'])} rounds. "
      f"Ray scores checked equal to vigil predict's in every round.\n")
print("| configuration | images/s | vs 1 actor | images/s per actor | actor time ms/image | actor CPU ms/image | model load s |")
print("|---|---:|---:|---:|---:|---:|---:|")
base = ray["summary"][0]["images_per_s"]
for s in ray["summary"]:
    print(f"| vigil.ray, {s['actors']} actor(s) x 1 CPU | {s['images_per_s']:.2f} | {s['images_per_s'] / base:.2f}x | "
          f"{s['images_per_s_per_actor']:.2f} | {s['busy_ms_per_image']:.1f} | {s['cpu_ms_per_image']:.1f} | {s['model_load_s']:.2f} |")
for t in (1, 2):
    p = load(f"{out}/plain-{t}.json")
    print(f"| vigil, one process, no Ray, {t} thread(s) | {p['images_per_s']:.2f} | | | {p['ms_per_image']:.1f} | "
          f"{p['cpu_ms_per_image']:.1f} | {p['model_load_s']:.2f} |")
pr = load(f"{out}/predict.json")
print(f"| vigil predict --list, all cores (model load and map/overlay/mask files included) | {pr['images'] / pr['seconds']:.2f} | | | | | |")
for path in sorted(glob.glob(f"{out}/anomalib-*.json")):
    a = load(path)
    print(f"| anomalib {a['anomalib']} {a['model']} batch inference, {a['threads']} thread(s) | {a['images_per_s']:.2f} | | | "
          f"{a['ms_per_image']:.1f} | {a['cpu_ms_per_image']:.1f} | (fit {a['fit_s']:.1f}) |")
PY
