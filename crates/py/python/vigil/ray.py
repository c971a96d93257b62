"""Scoring many images on a Ray cluster with Ray Data.

    import ray, vigil.ray
    ds = ray.data.read_images("s3://bucket/images/", include_paths=True)       # or a list of files
    scored = ds.map_batches(
        vigil.ray.VigilScorer,
        fn_constructor_kwargs={"model_path": "/shared/model.vigil"},
        concurrency=8,            # actors; each loads the model once
        num_cpus=4,               # CPUs per actor; vigil computes with exactly these
        batch_size=32,
    )
    scored.write_parquet("/shared/scores/")

or :func:`score_to_parquet`, which does the same. Images decoded by Ray (``read_images``, with
Pillow) are the same pixels vigil decodes from PNG, BMP and TIFF files, so the scores equal those
of ``vigil predict``; for JPEG, where decoders may differ by one level, read the files' bytes
(``ray.data.read_binary_files(..., include_paths=True)``): :class:`VigilScorer` then decodes them
as vigil does.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

import vigil

__all__ = ["VigilScorer", "score_to_parquet"]


def _actor_cpus() -> Optional[int]:
    """The CPUs Ray assigned to this worker, when running inside Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        return max(1, int(round(cpus))) if cpus else None
    except Exception:  # outside a Ray worker: no assignment to follow
        return None


class VigilScorer:
    """A callable class for ``Dataset.map_batches``: loads the model once per actor and scores
    each batch with it.

    Batches are those of ``read_images`` (an ``image`` column of (H, W[, C]) arrays, and ``path``
    with ``include_paths=True``) or of ``read_binary_files`` (a ``bytes`` column of encoded files,
    decoded as vigil decodes files). The output batch has ``path`` (when the input has it),
    ``score``, ``decided_value``, ``anomalous``, ``anomalous_pixels`` and, with ``maps=True``,
    ``map`` (float32 (H, W) arrays).

    Args:
        model_path: a model file every worker can read.
        threads: threads vigil computes with in this actor; default the CPUs Ray gave it
            (``num_cpus`` of ``map_batches``), else all cores.
        maps: also return the anomaly maps.
        **load_settings: passed to :func:`vigil.load` (pipeline settings, ``allow_other_weights``).
    """

    def __init__(self, model_path: str, threads: Optional[int] = None, maps: bool = False, **load_settings: Any):
        wanted = threads or _actor_cpus()
        if wanted and vigil.threads() != wanted:
            try:
                vigil.set_threads(wanted)
            except vigil.VigilError as e:  # the pool of this process was already built
                warnings.warn(str(e))
        self.model = vigil.load(model_path, **load_settings)
        self.maps = maps

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        if "bytes" in batch:
            blobs = [bytes(b) for b in batch["bytes"]]
            names = [str(p) for p in batch["path"]] if "path" in batch else None
            result = self.model.score_encoded(blobs, names)
        elif "image" in batch:
            result = self.model.score(list(batch["image"]))
        else:
            raise vigil.VigilError(
                f"a batch of columns {sorted(batch)}: expected 'image' (read_images) or 'bytes' (read_binary_files)"
            )
        out: Dict[str, Any] = {}
        if "path" in batch:
            out["path"] = np.asarray(batch["path"])
        out["score"] = result.scores
        out["decided_value"] = result.decided_values
        out["anomalous"] = result.verdicts
        out["anomalous_pixels"] = np.array([int(m.sum()) for m in result.masks], dtype=np.int64)
        if self.maps:
            shapes = {m.shape for m in result.maps}
            if len(shapes) == 1:
                out["map"] = np.stack(result.maps)
            else:
                column = np.empty(len(result.maps), dtype=object)
                column[:] = result.maps
                out["map"] = column
        return out


def score_to_parquet(
    images: Union[str, Sequence[str]],
    model_path: str,
    output: str,
    actors: int = 2,
    cpus_per_actor: int = 1,
    batch_size: int = 16,
    maps: bool = False,
    read_bytes: bool = False,
) -> Any:
    """Scores a folder or a list of image files (local paths or URIs Ray can read) on the current
    Ray cluster and writes the scores to Parquet files in ``output``; returns the scored dataset.

    ``read_bytes=True`` reads the encoded files and lets vigil decode them (JPEG scores then equal
    ``vigil predict``'s exactly).
    """
    import ray

    paths: Union[str, List[str]] = images if isinstance(images, str) else [os.fspath(p) for p in images]
    if read_bytes:
        ds = ray.data.read_binary_files(paths, include_paths=True)
    else:
        ds = ray.data.read_images(paths, include_paths=True)
    scored = ds.map_batches(
        VigilScorer,
        fn_constructor_kwargs={"model_path": model_path, "threads": cpus_per_actor, "maps": maps},
        concurrency=actors,
        num_cpus=cpus_per_actor,
        batch_size=batch_size,
        batch_format="numpy",
    )
    scored.write_parquet(output)
    return scored
