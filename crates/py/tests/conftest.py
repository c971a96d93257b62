"""Shared fixtures: the `vigil` command (the CLI the Python package must agree with), a model of the
demo class fitted by it, and a few hundred small generated images for the cluster tests."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "data" / "demo" / "PA_BDP01_TL"
# The demo's method and threshold (crates/cli/src/demo.rs).
DEMO_METHOD = "acontrario:feature=gabor,statistics=training"
# A small, fast configuration for the many-image tests (as in crates/cli/tests/cli.rs).
SMALL_METHOD = "acontrario:statistics=training,scales=2,patch_size=7,components=8"


def vigil_bin() -> str:
    path = Path(os.environ.get("VIGIL_BIN", REPO / "target" / "release" / "vigil"))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: build the CLI first (cargo build --release -p vigil-cli) or set VIGIL_BIN")
    return str(path)


def run_cli(*args: str) -> str:
    out = subprocess.run([vigil_bin(), *args], capture_output=True, text=True, env={**os.environ, "VIGIL_NO_PROGRESS": "1"})
    if out.returncode != 0:
        raise AssertionError(f"vigil {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def read_scores(out_dir: Path) -> list[dict]:
    with open(out_dir / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_tiff_map(path: str) -> np.ndarray:
    return np.array(Image.open(path), dtype=np.float32)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "model.vigil"
    run_cli("fit", "-m", DEMO_METHOD, "--train", str(DEMO), "--threshold", "max", "-o", str(path))
    return path


@pytest.fixture(scope="session")
def demo_prediction(demo_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_predict")
    run_cli("predict", "--model", str(demo_model), str(DEMO / "test"), "-o", str(out), "--overwrite")
    return out


@pytest.fixture(scope="session")
def many_images(tmp_path_factory):
    """300 small gray/colour PNG images of noise, a third with a dark square, in two folders, and a
    model fitted on 12 normal ones by the CLI. Returns (model path, list of image paths)."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(5)
    train = root / "train"
    train.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(100, 156, (32, 32, 3), dtype=np.uint8)).save(train / f"{i:03}.png")
    paths = []
    for i in range(300):
        a = rng.integers(100, 156, (32, 32, 3), dtype=np.uint8)
        if i % 3 == 0:
            a[8:16, 10:18] = 20
        folder = root / "images" / ("cam-a" if i % 2 else "cam-b")
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / f"{i:04}.png"
        Image.fromarray(a).save(p)
        paths.append(str(p))
    model = root / "model.vigil"
    run_cli("fit", "-m", SMALL_METHOD, "--train", str(train), "--threshold", "max", "-o", str(model))
    return model, paths


@pytest.fixture(scope="session")
def many_cli_scores(many_images, tmp_path_factory) -> dict:
    """`vigil predict --list` of the many images: path -> (score, verdict)."""
    model, paths = many_images
    root = tmp_path_factory.mktemp("many_cli")
    listing = root / "list.txt"
    listing.write_text("".join(p + "\n" for p in paths))
    run_cli("predict", "--model", str(model), "--list", str(listing), "-o", str(root / "out"))
    return {r["path"]: (np.float32(r["score"]), r["verdict"] == "anomalous") for r in read_scores(root / "out")}
