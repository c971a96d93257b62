"""The Python API against the `vigil` command on the demo class: the same engine must give the same
numbers; and errors raised as VigilError with vigil's messages."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vigil
from conftest import DEMO, DEMO_METHOD, read_scores, read_tiff_map, run_cli


def test_scores_verdicts_maps_and_masks_equal_the_cli(demo_model, demo_prediction):
    rows = read_scores(demo_prediction)
    model = vigil.load(demo_model)
    result = model.score(DEMO / "test")
    assert result.names == [r["path"] for r in rows]
    np.testing.assert_array_equal(result.scores, np.array([np.float32(r["score"]) for r in rows]))
    np.testing.assert_array_equal(result.verdicts, [r["verdict"] == "anomalous" for r in rows])
    np.testing.assert_array_equal(result.decided_values, [float(r["decided_value"]) for r in rows])
    assert result.threshold == float(rows[0]["threshold"])
    for r, m, k in zip(rows, result.maps, result.masks):
        np.testing.assert_array_equal(m, read_tiff_map(r["map"]))
        written = np.array(Image.open(r["mask"]))
        np.testing.assert_array_equal(k, (written > 0).any(axis=-1) if written.ndim == 3 else written > 0)
        assert int(k.sum()) == int(r["anomalous_pixels"])
    assert 0 < result.verdicts.sum() < len(result), "the demo has normal and anomalous images"


def test_arrays_score_as_the_files_they_came_from(demo_model):
    model = vigil.load(demo_model)
    files = sorted((DEMO / "test" / "impurity").glob("*.png"))[:3]
    from_files = model.score(files)
    pixels = [np.array(Image.open(f)) for f in files]
    assert pixels[0].dtype == np.uint8 and pixels[0].ndim == 3
    for images in (pixels, np.stack(pixels), [p.astype(np.float32) / np.float32(255) for p in pixels]):
        result = model.score(images)
        np.testing.assert_array_equal(result.scores, from_files.scores)
        for a, b in zip(result.maps, from_files.maps):
            np.testing.assert_array_equal(a, b)
    one = model.score(pixels[0])
    assert len(one) == 1 and one.names == ["array[0]"] and one.scores[0] == from_files.scores[0]
    # 16-bit pixels are scaled by their range: the same image within float rounding.
    wide = model.score(pixels[0].astype(np.uint16) * 257)
    np.testing.assert_allclose(wide.scores, from_files.scores[:1], rtol=1e-4)
    # Encoded bytes are decoded as the files are.
    encoded = model.score_encoded([f.read_bytes() for f in files], [str(f) for f in files])
    np.testing.assert_array_equal(encoded.scores, from_files.scores)


def test_fit_in_python_equals_fit_on_the_command_line(demo_model, tmp_path):
    model = vigil.fit(DEMO_METHOD, train=DEMO, threshold="max")
    cli_model = vigil.load(demo_model)
    assert model.thresholds == cli_model.thresholds
    assert model.method == "acontrario" and model.info["settings"]["feature"] == "gabor"
    files = sorted((DEMO / "test" / "good").glob("*.png"))[:2]
    np.testing.assert_array_equal(model.score(files).scores, cli_model.score(files).scores)
    saved = tmp_path / "py.vigil"
    model.save(saved)
    np.testing.assert_array_equal(vigil.load(saved).score(files).scores, cli_model.score(files).scores)
    with pytest.raises(vigil.VigilError, match="already exists"):
        model.save(saved)
    model.save(saved, overwrite=True)


def test_metrics_equal_vigil_test(demo_model, tmp_path):
    out = tmp_path / "test"
    run_cli("test", "--model", str(demo_model), "--data", str(DEMO), "-o", str(out))
    reported = json.loads((out / "metrics.json").read_text())["metrics"]
    model = vigil.load(demo_model)
    result = model.score(DEMO / "test")
    labels = ["/impurity/" in n for n in result.names]
    truth = []
    for name, m in zip(result.names, result.maps):
        p = Path(name)
        gt = DEMO / "ground_truth" / "impurity" / f"{p.stem}_mask.png"
        truth.append(np.array(Image.open(gt)) > 0 if gt.exists() else np.zeros(m.shape, bool))
    assert vigil.metrics.auroc(result.scores, labels) == reported["image_auroc"]
    assert vigil.metrics.average_precision(result.scores, labels) == reported["image_ap"]
    assert vigil.metrics.pixel_auroc(result.maps, truth) == reported["pixel_auroc"]
    assert vigil.metrics.aupro(result.maps, truth) == reported["aupro"]
    f1, threshold = vigil.metrics.f1_max(result.scores, labels)
    assert f1 == reported["image_f1_max"] and np.isfinite(threshold)
    with pytest.raises(vigil.VigilError, match="auroc"):
        vigil.metrics.auroc([0.1, 0.2], [True, True])


def test_errors_are_vigil_errors_with_vigils_messages(demo_model, tmp_path):
    model = vigil.load(demo_model)
    missing = tmp_path / "missing.png"
    with pytest.raises(vigil.VigilError, match="missing.png"):
        model.score(missing)
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(b"not an image at all")
    with pytest.raises(vigil.VigilError, match="damaged.png.*not an image"):
        model.score([damaged])
    skipping = vigil.load(demo_model, skip_bad=True)
    good = sorted((DEMO / "test" / "good").glob("*.png"))[0]
    result = skipping.score([damaged, good])
    assert result.names == [str(good)] and result.skipped[0][0] == str(damaged)
    with pytest.raises(vigil.VigilError, match="outside \\[0, 1\\]"):
        model.score(np.full((16, 16), 2.0, dtype=np.float32))
    with pytest.raises(vigil.VigilError, match="int64 are not supported"):
        model.score(np.zeros((16, 16), dtype=np.int64))
    with pytest.raises(vigil.VigilError, match="shape"):
        model.score(np.zeros((2, 2, 2, 2, 2), dtype=np.uint8))
    with pytest.raises(vigil.VigilError, match="unknown method 'nope'"):
        vigil.fit("nope", train=DEMO)
    with pytest.raises(vigil.VigilError, match="no_such_setting"):
        vigil.fit("acontrario", train=DEMO, no_such_setting=3)
    with pytest.raises(vigil.VigilError, match="train=<folder> is required"):
        vigil.fit("acontrario:statistics=training")
    with pytest.raises(vigil.VigilError, match="nowhere.vigil"):
        vigil.load(tmp_path / "nowhere.vigil")
    with pytest.raises(vigil.VigilError, match="load\\(\\) takes no setting 'threshold'"):
        vigil.load(demo_model, threshold="max")
    with pytest.raises(vigil.VigilError, match="can be set once per process"):
        vigil.set_threads(1)


def test_the_interpreter_runs_other_threads_while_vigil_computes(demo_model):
    model = vigil.load(demo_model)
    files = sorted((DEMO / "test").rglob("*.png")) * 2
    done = threading.Event()
    worker = threading.Thread(target=lambda: (model.score(files), done.set()))
    count = 0
    worker.start()
    while not done.is_set():
        count += 1
    worker.join()
    # With the lock held during scoring, this loop would stand still until scoring ended.
    assert count > 10_000, count
