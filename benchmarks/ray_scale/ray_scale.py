#!/usr/bin/env python
"""vigil on Ray: images per second against the number of scoring actors, and what one image costs an
actor (benchmarks/ray_scale/run.sh runs it; the venv needs vigil and ray[data]).

  ray_scale.py ray   --model M --list FILE --out DIR [--actors 1,2,4] [--rounds 3] [--batch-size 32]
                     [--check scores.csv]
      One local Ray cluster (ray.init with max(actors) + 2 logical CPUs: one per actor and two for
      the read and write tasks). For each actor count, `read_binary_files` of the listed images ->
      `map_batches(VigilScorer, concurrency=k, num_cpus=1)` (each actor loads the model once and
      computes with 1 thread; vigil decodes the files, as `vigil predict` does) -> Parquet. The job
      is timed from the dataset's creation to the last Parquet file, actor start included; rounds
      alternate the order of the actor counts. Each actor also records, per batch, its wall time
      and its process CPU time inside the scorer, and the time its model took to load. With
      --check, every round's scores must equal that `vigil predict` scores.csv (else exit 1).
  ray_scale.py plain --model M --list FILE --threads T [--rounds 3] [--batch-size 32]
      The same scoring in this one process without Ray (`vigil.load(M).score(paths)` in batches):
      the floor the Ray figures are compared with.

Each prints one JSON document on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def read_list(path: str) -> list[str]:
    with open(path) as f:
        paths = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if not paths:
        sys.exit(f"{path}: no image paths in the list")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        sys.exit(f"{path}: {len(missing)} listed files do not exist, e.g. {missing[0]}")
    return paths


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_plain(args) -> dict:
    import vigil

    vigil.set_threads(args.threads)
    paths = read_list(args.list)
    t0 = time.perf_counter()
    model = vigil.load(args.model)
    load_s = time.perf_counter() - t0
    model.score(paths[: args.batch_size])  # warm-up
    rounds = []
    for r in range(args.rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(paths), args.batch_size):
            model.score(paths[i : i + args.batch_size])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rounds.append({"seconds": wall, "cpu_seconds": cpu})
        log(f"plain, {args.threads} thread(s), round {r + 1}: {len(paths) / wall:.2f} images/s")
    wall = statistics.median(x["seconds"] for x in rounds)
    return {
        "kind": "plain",
        "threads": args.threads,
        "images": len(paths),
        "model_load_s": load_s,
        "rounds": rounds,
        "images_per_s": len(paths) / wall,
        "ms_per_image": 1000 * wall / len(paths),
        "cpu_ms_per_image": 1000 * statistics.median(x["cpu_seconds"] for x in rounds) / len(paths),
    }


def cmd_ray(args) -> dict:
    import pyarrow.parquet as pq
    import ray

    import vigil.ray

    class TimedScorer(vigil.ray.VigilScorer):
        """VigilScorer that also reports, per image, the actor's time inside the scorer."""

        def __init__(self, **kwargs):
            t0 = time.perf_counter()
            super().__init__(**kwargs)
            self.load_s = time.perf_counter() - t0
            self.pid = os.getpid()

        def __call__(self, batch):
            t0, c0 = time.perf_counter(), time.process_time()
            out = super().__call__(batch)
            n = len(out["score"])
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            out["actor"] = np.full(n, self.pid, dtype=np.int64)
            out["busy_s"] = np.full(n, wall / n)
            out["cpu_s"] = np.full(n, cpu / n)
            out["load_s"] = np.full(n, self.load_s)
            return out

    paths = read_list(args.list)
    actor_counts = [int(a) for a in args.actors.split(",")]
    expected = None
    if args.check:
        with open(args.check, newline="") as f:
            expected = {os.path.abspath(r["path"]): np.float32(r["score"]) for r in csv.DictReader(f)}
        absent = [p for p in paths if os.path.abspath(p) not in expected]
        if absent:
            sys.exit(f"{args.check}: no score for {len(absent)} listed images, e.g. {absent[0]}")
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=max(actor_counts) + 2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False

    def job(images: list[str], actors: int, folder: Path) -> float:
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        ds = ray.data.read_binary_files(images, include_paths=True)
        ds.map_batches(
            TimedScorer,
            fn_constructor_kwargs={"model_path": args.model, "threads": 1},
            concurrency=actors,
            num_cpus=1,
            batch_size=args.batch_size,
            batch_format="numpy",
        ).write_parquet(str(folder))
        return time.perf_counter() - t0

    # Starts Ray's worker processes and imports vigil in them before anything is timed.
    job(paths[: 2 * args.batch_size], max(actor_counts), out_root / "warm-up")
    runs = []
    for r in range(args.rounds):
        order = actor_counts if r % 2 == 0 else actor_counts[::-1]
        for k in order:
            folder = out_root / f"actors{k}-round{r + 1}"
            wall = job(paths, k, folder)
            t = pq.read_table(str(folder)).to_pydict()
            if len(t["path"]) != len(paths):
                sys.exit(f"{folder}: {len(t['path'])} rows for {len(paths)} images")
            if expected is not None:
                got = {("/" + p if not p.startswith("/") else p): np.float32(s) for p, s in zip(t["path"], t["score"])}
                wrong = [p for p in paths if got.get(os.path.abspath(p)) != expected[os.path.abspath(p)]]
                if wrong:
                    sys.exit(f"{folder}: {len(wrong)} scores differ from {args.check}, e.g. {wrong[0]}")
            per_actor = {}
            for pid, busy, cpu, load in zip(t["actor"], t["busy_s"], t["cpu_s"], t["load_s"]):
                a = per_actor.setdefault(pid, {"images": 0, "busy_s": 0.0, "cpu_s": 0.0, "load_s": load})
                a["images"] += 1
                a["busy_s"] += busy
                a["cpu_s"] += cpu
            runs.append(
                {
                    "actors": k,
                    "round": r + 1,
                    "seconds": wall,
                    "images_per_s": len(paths) / wall,
                    "actors_seen": len(per_actor),
                    "busy_ms_per_image": 1000 * sum(a["busy_s"] for a in per_actor.values()) / len(paths),
                    "cpu_ms_per_image": 1000 * sum(a["cpu_s"] for a in per_actor.values()) / len(paths),
                    "model_load_s": statistics.mean(a["load_s"] for a in per_actor.values()),
                    "images_per_actor": sorted(a["images"] for a in per_actor.values()),
                }
            )
            log(f"ray, {k} actor(s), round {r + 1}: {len(paths) / wall:.2f} images/s ({len(per_actor)} actors scored)")
            shutil.rmtree(folder, ignore_errors=True)
    ray.shutdown()
    summary = []
    for k in actor_counts:
        mine = [x for x in runs if x["actors"] == k]
        wall = statistics.median(x["seconds"] for x in mine)
        summary.append(
            {
                "actors": k,
                "images_per_s": len(paths) / wall,
                "images_per_s_per_actor": len(paths) / wall / k,
                "busy_ms_per_image": statistics.median(x["busy_ms_per_image"] for x in mine),
                "cpu_ms_per_image": statistics.median(x["cpu_ms_per_image"] for x in mine),
                "model_load_s": statistics.median(x["model_load_s"] for x in mine),
            }
        )
    return {
        "kind": "ray",
        "images": len(paths),
        "batch_size": args.batch_size,
        "checked_against": args.check,
        "runs": runs,
        "summary": summary,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["ray", "plain"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--list", required=True, help="image paths, one a line")
    ap.add_argument("--out", help="scratch folder for the Parquet outputs (ray)")
    ap.add_argument("--actors", default="1,2,4")
    ap.add_argument("--threads", type=int, default=1, help="threads of the plain run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--check", help="a vigil predict scores.csv the Ray scores must equal")
    args = ap.parse_args()
    if args.rounds < 1 or args.batch_size < 1:
        sys.exit("--rounds and --batch-size must be at least 1")
    if args.kind == "ray":
        if not args.out:
            sys.exit("ray needs --out DIR (scratch folder for the Parquet files)")
        result = cmd_ray(args)
    else:
        result = cmd_plain(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
