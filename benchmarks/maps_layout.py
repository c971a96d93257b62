"""The maps layout every side-by-side benchmark writes from both tools, and the one metric code that reads it.

A maps folder holds `maps.f32` (the test images' anomaly maps one after another, row-major, little-endian f32,
each at its image's size) and `index.json` (`images`: per map its path relative to the class folder, image
score, width and height; plus whatever the writer adds: fit time, scoring time per image, losses). vigil writes
it with `target/release/examples/method_maps` (benchmarks/bench); the peer scripts with `write_maps`.
`metrics` computes image AUROC, pixel AUROC, the exact MVTec AUPRO@0.3 and pixel AP from it with `anomalib_bench`
(../shared/peers: the data layout and the AUPRO), so both tools are measured by the same code.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

PEERS = Path(__file__).resolve().parent.parent.parent / "shared" / "peers"
sys.path.insert(0, str(PEERS))
import anomalib_bench as peer  # noqa: E402  (backbone loader, data layout and the MVTec AUPRO)


def write_maps(out: Path, maps: list[np.ndarray], index: list[dict], **meta) -> None:
    """Writes `maps` (2-D arrays in `index` order) and `index.json` with `meta` beside the images."""
    out.mkdir(parents=True, exist_ok=True)
    np.concatenate([np.asarray(m, dtype="<f4").ravel() for m in maps]).tofile(out / "maps.f32")
    (out / "index.json").write_text(json.dumps({"images": index, **meta}))


def load_maps(maps_dir: Path):
    """{relative path: (score, map)} and the whole index.json."""
    meta = json.loads((maps_dir / "index.json").read_text())
    flat = np.fromfile(maps_dir / "maps.f32", dtype="<f4")
    maps, offset = {}, 0
    for item in meta["images"]:
        n = item["width"] * item["height"]
        maps[item["path"]] = (item["score"], flat[offset:offset + n].reshape(item["height"], item["width"]))
        offset += n
    if offset != len(flat):
        raise SystemExit(f"{maps_dir}/maps.f32 holds {len(flat)} values, index.json describes {offset}")
    return maps, meta


def metrics(class_dir: Path, maps_dir: Path, blur: float = 0.0) -> dict:
    """The class's metrics from one maps folder, with the writer's fit and scoring times. With `blur` > 0 each
    map is Gaussian-blurred (sigma in pixels, as PatchCore's post-processing) and the score is its maximum: a
    diagnostic, not part of any method."""
    maps, meta = load_maps(maps_dir)
    _, test, labels, gts = peer.load_class(class_dir)
    scores, pixel_maps = [], []
    for path in test:
        key = str(path.relative_to(class_dir))
        if key not in maps:
            raise SystemExit(f"{maps_dir}: no map for {key}")
        score, m = maps[key]
        if blur > 0:
            from scipy.ndimage import gaussian_filter
            m = gaussian_filter(m.astype(np.float64), sigma=blur, mode="reflect", truncate=4.0)
            score = float(m.max())
        scores.append(score)
        pixel_maps.append(m)
    truth = np.concatenate([g.ravel() for g in gts])
    pixels = np.concatenate([m.ravel() for m in pixel_maps])
    return {
        "class": class_dir.name,
        "image_auroc": float(roc_auc_score(labels, scores)),
        "pixel_auroc": float(roc_auc_score(truth, pixels)),
        "aupro": peer.mvtec_aupro(pixel_maps, gts),
        "pixel_ap": float(average_precision_score(truth, pixels)),
        "fit_s": meta.get("fit_s"),
        "score_s_per_image": meta.get("score_s_per_image"),
    }
