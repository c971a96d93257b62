#!/usr/bin/env python
"""The peer side of benchmarks/ray_scale: anomalib 2.7's batch inference of the same model family on the
same images (run with the venv of ../shared/peers/install.sh).

  anomalib_batch.py --train CLASSDIR --images DIR [--model padim|patchcore] [--threads 1]
                    [--batch-size 32] [--rounds 3] [--image-size 256]

Fits anomalib's PaDiM or PatchCore with the local MobileNetV2 ImageNet weights (features.6 +
features.13, the layers vigil's presets tap; built by ../shared/peers/anomalib_bench.py, as in the
other side-by-side benchmarks) on CLASSDIR/train/good, then scores every image under DIR as
anomalib's batch inference does: `PredictDataset(DIR)` in a `DataLoader` (its collate function, no
worker processes: decoding counts) and the model's forward (its pre-processor resizes and
normalises; no post-processor, so no normalised score or verdict: less work than vigil's side,
which also thresholds and makes masks). `torch.set_num_threads(--threads)`. Timed over the whole
folder after one warm-up batch; rounds give a median. Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

PEERS = Path(__file__).resolve().parents[2].parent / "shared" / "peers"
sys.path.insert(0, str(Path(os.environ.get("VIGIL_PEERS_DIR", PEERS))))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import anomalib  # noqa: E402
from anomalib.data import PredictDataset  # noqa: E402
from anomalib_bench import build_model, fit_model, list_images, load_images  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="an MVTec-layout class folder (its train/good is fitted)")
    ap.add_argument("--images", required=True, help="folder of the images to score")
    ap.add_argument("--model", default="padim", choices=["padim", "patchcore"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=256)
    args = ap.parse_args()
    if args.threads < 1 or args.batch_size < 1 or args.rounds < 1:
        sys.exit("--threads, --batch-size and --rounds must be at least 1")
    train_paths = list_images(Path(args.train) / "train" / "good")
    if not train_paths:
        sys.exit(f"{args.train}/train/good: no training images")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = build_model(args.model, args.image_size)
    t0 = time.perf_counter()
    fit_model(model, args.model, load_images(train_paths, model.pre_processor.transform))
    fit_s = time.perf_counter() - t0
    model.eval()

    dataset = PredictDataset(path=args.images)
    n = len(dataset)
    if n == 0:
        sys.exit(f"{args.images}: no images")

    def score_all(limit: int | None = None) -> int:
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=0,
                            collate_fn=dataset.collate_fn)
        done = 0
        with torch.inference_mode():
            for batch in loader:
                out = model(batch.image)
                done += int(out.pred_score.reshape(-1).shape[0])
                if limit is not None and done >= limit:
                    break
        return done

    score_all(limit=args.batch_size)  # warm-up
    rounds = []
    for r in range(args.rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        done = score_all()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if done != n:
            sys.exit(f"scored {done} of {n} images")
        rounds.append({"seconds": wall, "cpu_seconds": cpu})
        print(f"anomalib {args.model}, {args.threads} thread(s), round {r + 1}: {n / wall:.2f} images/s",
              file=sys.stderr, flush=True)
    wall = statistics.median(x["seconds"] for x in rounds)
    print(json.dumps({
        "kind": "anomalib",
        "model": args.model,
        "anomalib": anomalib.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "images": n,
        "batch_size": args.batch_size,
        "fit_s": fit_s,
        "rounds": rounds,
        "images_per_s": n / wall,
        "ms_per_image": 1000 * wall / n,
        "cpu_ms_per_image": 1000 * statistics.median(x["cpu_seconds"] for x in rounds) / n,
    }))


if __name__ == "__main__":
    main()
