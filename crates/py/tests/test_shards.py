"""`vigil predict --list --shard I/N`: four shards concatenated are the unsharded run, and they agree
with the Python API."""

from __future__ import annotations

import numpy as np

import vigil
from conftest import read_scores, run_cli


def test_four_shards_equal_the_unsharded_run_and_the_api(many_images, many_cli_scores, tmp_path):
    model, paths = many_images
    listing = tmp_path / "list.txt"
    listing.write_text("".join(p + "\n" for p in paths))
    rows = []
    for i in range(4):
        out = tmp_path / f"shard{i}"
        run_cli("predict", "--model", str(model), "--list", str(listing), "--shard", f"{i}/4", "-o", str(out))
        rows += read_scores(out)
    assert [r["path"] for r in rows] == paths
    assert {r["path"]: (np.float32(r["score"]), r["verdict"] == "anomalous") for r in rows} == many_cli_scores
    api = vigil.load(model).score(paths)
    np.testing.assert_array_equal(api.scores, [np.float32(r["score"]) for r in rows])
    np.testing.assert_array_equal(api.verdicts, [r["verdict"] == "anomalous" for r in rows])
    assert api.verdicts[::3].all() and 0 < api.verdicts.sum() < len(paths)
