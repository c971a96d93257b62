"""Spark in local mode: mapInPandas with vigil.spark.scorer over binaryFile rows scores 300 images as
`vigil predict` does."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from pyspark.sql import SparkSession

import vigil.spark


@pytest.fixture(scope="module")
def spark():
    # Spark's Python workers run `python3` from PATH unless told otherwise: make them this
    # interpreter, whose environment has vigil (a venv need not be on PATH).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (
        SparkSession.builder.master("local[2]")
        .appName("vigil-test")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def test_spark_scores_as_the_cli(spark, many_images, many_cli_scores, tmp_path):
    model, paths = many_images
    files = spark.read.format("binaryFile").load(paths).select("path", "content").repartition(4)
    scored = files.mapInPandas(vigil.spark.scorer(str(model), threads=1), schema=vigil.spark.SCHEMA)
    out = tmp_path / "scores"
    scored.write.parquet(str(out))
    rows = spark.read.parquet(str(out)).collect()
    got = {r.path.removeprefix("file:"): (np.float32(r.score), r.anomalous) for r in rows}
    assert got == many_cli_scores


def test_spark_path_rows_read_the_files(spark, many_images, many_cli_scores):
    model, paths = many_images
    df = spark.createDataFrame([(p,) for p in paths[:30]], "path string").repartition(3)
    rows = df.mapInPandas(vigil.spark.scorer(str(model)), schema=vigil.spark.SCHEMA).collect()
    assert {r.path: (np.float32(r.score), r.anomalous) for r in rows} == {p: many_cli_scores[p] for p in paths[:30]}
