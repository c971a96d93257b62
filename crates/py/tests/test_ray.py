"""Ray: a local cluster of several worker processes scores 300 images with vigil.ray.VigilScorer
(model loaded once per actor), writing Parquet; the scores equal `vigil predict`'s."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

import vigil.ray


@pytest.fixture(scope="module")
def cluster():
    # Two scoring actors of one CPU each, in their own worker processes, and CPUs left for the
    # read and write tasks (with only the actors' CPUs the reads would wait for ever).
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _table(folder) -> dict:
    t = pq.read_table(str(folder)).to_pydict()
    return {p: (np.float32(s), a) for p, s, a in zip(t["path"], t["score"], t["anomalous"])}


def test_ray_actors_score_as_the_cli(cluster, many_images, many_cli_scores, tmp_path):
    model, paths = many_images
    out = tmp_path / "scores"
    scored = vigil.ray.score_to_parquet(paths, str(model), str(out), actors=2, cpus_per_actor=1, batch_size=25)
    assert scored is not None
    got = _table(out)
    # read_images reports paths without the leading slash of an absolute local path.
    got = {("/" + p if not p.startswith("/") else p): v for p, v in got.items()}
    assert got == many_cli_scores


def test_ray_bytes_route_and_maps(cluster, many_images, many_cli_scores, tmp_path):
    model, paths = many_images
    ds = ray.data.read_binary_files(paths[:40], include_paths=True)
    rows = ds.map_batches(
        vigil.ray.VigilScorer,
        fn_constructor_kwargs={"model_path": str(model), "maps": True},
        concurrency=2,
        num_cpus=1,
        batch_size=10,
        batch_format="numpy",
    ).take_all()
    assert len(rows) == 40
    for r in rows:
        path = r["path"] if r["path"].startswith("/") else "/" + r["path"]
        assert (np.float32(r["score"]), bool(r["anomalous"])) == many_cli_scores[path]
        assert r["map"].shape == (32, 32) and r["map"].dtype == np.float32
        assert np.float32(r["map"].max()) == np.float32(r["score"])
