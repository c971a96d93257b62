"""Scoring many images with Apache Spark (``DataFrame.mapInPandas``).

    from pyspark.sql import SparkSession
    import vigil.spark
    spark = SparkSession.builder.getOrCreate()
    files = spark.read.format("binaryFile").option("pathGlobFilter", "*.png").load("/data/images")
    scores = files.select("path", "content").mapInPandas(
        vigil.spark.scorer("/shared/model.vigil", threads=4), schema=vigil.spark.SCHEMA)
    scores.write.parquet("/shared/scores")

The encoded files (``binaryFile``'s ``content``) are decoded by vigil as it decodes files, so the
scores equal ``vigil predict``'s. A DataFrame with only a ``path`` column (files every worker can
read) works too. The model is loaded once per Python worker process and kept for the next tasks.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import vigil

__all__ = ["SCHEMA", "scorer"]

#: The columns :func:`scorer` returns, as a Spark DDL schema for ``mapInPandas``.
SCHEMA = "path string, score float, decided_value double, anomalous boolean, anomalous_pixels long"

# One model per worker process and model file: Spark reuses Python workers between tasks.
_models: Dict[Tuple[str, Tuple[Tuple[str, Any], ...]], "vigil.Model"] = {}


def _model(model_path: str, threads: Optional[int], load_settings: Dict[str, Any]) -> "vigil.Model":
    key = (model_path, tuple(sorted(load_settings.items())))
    if key not in _models:
        if threads and vigil.threads() != threads:
            try:
                vigil.set_threads(threads)
            except vigil.VigilError:  # this worker already computed: keep its pool
                pass
        _models[key] = vigil.load(model_path, **load_settings)
    return _models[key]


def scorer(model_path: str, threads: Optional[int] = None, **load_settings: Any) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """A function for ``DataFrame.mapInPandas(f, schema=SCHEMA)``.

    Input batches have ``path`` and optionally ``content`` (the file's bytes, as
    ``spark.read.format("binaryFile")`` gives); without ``content`` the files are read from
    ``path``. Output rows: ``path``, ``score``, ``decided_value``, ``anomalous``,
    ``anomalous_pixels``.

    Args:
        model_path: a model file every worker can read.
        threads: threads vigil computes with in each worker (set it to the cores per task,
            ``spark.task.cpus``); default all cores.
        **load_settings: passed to :func:`vigil.load`.
    """

    def score_batches(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        model = _model(model_path, threads, load_settings)
        for pdf in batches:
            if len(pdf) == 0:
                continue
            paths = [str(p) for p in pdf["path"]]
            if "content" in pdf.columns:
                result = model.score_encoded([bytes(b) for b in pdf["content"]], paths)
            else:
                result = model.score([_local(p) for p in paths])
            yield pd.DataFrame(
                {
                    "path": paths,
                    "score": result.scores,
                    "decided_value": result.decided_values,
                    "anomalous": result.verdicts,
                    "anomalous_pixels": [int(m.sum()) for m in result.masks],
                }
            )

    return score_batches


def _local(path: str) -> str:
    """A ``file:`` URI as Spark writes paths, as a local path."""
    return path[len("file:") :] if path.startswith("file:") else path
