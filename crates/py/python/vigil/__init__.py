"""vigil: unsupervised visual anomaly detection from Python.

Fit a model on normal images, then score new ones: an anomaly score, a verdict, an anomaly map and
a predicted mask per image. The work is done by the same Rust engine as the ``vigil`` command, so
``vigil.load("m.vigil").score(paths)`` gives the numbers ``vigil predict`` writes.

    import vigil
    model = vigil.fit("acontrario:feature=gabor,statistics=training", train="data/demo/PA_BDP01_TL",
                      threshold="max")
    result = model.score("data/demo/PA_BDP01_TL/test/impurity")   # a folder, file(s) or arrays
    result.scores, result.verdicts, result.maps[0], result.masks[0]

Errors are raised as :class:`VigilError` with vigil's message (naming the file and the problem).
The interpreter lock is released while vigil computes; :func:`set_threads` sets how many threads
it computes with (default: all cores, or ``RAYON_NUM_THREADS``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _vigil
from ._vigil import VigilError, __version__
from . import metrics

__all__ = [
    "Model",
    "Scores",
    "VigilError",
    "fit",
    "load",
    "metrics",
    "set_threads",
    "threads",
    "__version__",
]

PathLike = Union[str, "os.PathLike[str]"]
Images = Union[PathLike, Sequence[PathLike], np.ndarray, Sequence[np.ndarray]]

_DTYPES = (np.uint8, np.uint16, np.float32, np.float64)


def set_threads(threads: int) -> None:
    """Compute with this many threads in this process.

    Call it once, before the first fit or score (the thread pool is built then); a second call, or
    one after computing, raises :class:`VigilError`. In a Ray actor or Spark worker set it to the
    CPUs the worker was given (``vigil.ray.VigilScorer`` does).
    """
    _vigil.set_threads(int(threads))


def threads() -> int:
    """The number of threads this process computes with."""
    return _vigil.threads()


def _settings(settings: Dict[str, Any]) -> List[Tuple[str, str]]:
    """Keyword arguments as vigil's command line writes them (``True`` -> ``true``); None leaves a
    setting at its default."""
    out = []
    for key, value in settings.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, os.PathLike):
            text = os.fspath(value)
        else:
            text = str(value)
        out.append((key, text))
    return out


@dataclass(frozen=True)
class Scores:
    """What :meth:`Model.score` returns, one entry per image, in input order.

    Attributes:
        names: the file path of each image, or ``array[i]`` for arrays.
        scores: image anomaly scores, float32, shape (N,).
        decided_values: the value compared with the threshold (the image score, or for NFA
            thresholds the most significant log10 NFA), float64, shape (N,).
        verdicts: True where the image is anomalous, bool, shape (N,).
        maps: anomaly maps, one float32 (H, W) array per image.
        masks: predicted anomalous pixels, one bool (H, W) array per image.
        threshold: the value ``decided_values`` are compared with.
        skipped: (path, reason) of files left out when the model was loaded with ``skip_bad=True``.
    """

    names: List[str]
    scores: np.ndarray
    decided_values: np.ndarray
    verdicts: np.ndarray
    maps: List[np.ndarray]
    masks: List[np.ndarray]
    threshold: float
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)


def _as_image_array(a: Any, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise VigilError(f"{name}: an image array is (H, W) or (H, W, C), got shape {a.shape}")
    if a.dtype not in _DTYPES:
        raise VigilError(
            f"{name}: pixels of type {a.dtype} are not supported; give uint8, uint16, or float32/float64 in [0, 1]"
        )
    return np.ascontiguousarray(a)


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


class Model:
    """A fitted model: method, learned state, image pipeline and thresholds.

    Made by :func:`fit` or :func:`load`; scores with :meth:`score`, is written by :meth:`save`.
    """

    def __init__(self, native: "_vigil.NativeModel") -> None:
        self._native = native
        self._info: Dict[str, Any] = json.loads(native.info_json())

    def score(self, images: Images) -> Scores:
        """Scores images.

        Args:
            images: a path (file or folder), a list of paths, an image array — (H, W) gray or
                (H, W, C) with C = 1, 2, 3 or 4 (alpha is dropped) — an (N, H, W, C) batch, or a
                list of image arrays. Arrays are uint8, uint16 (scaled by their range, as when a
                file is decoded) or float in [0, 1]; the same pixels as a file give the same scores.

        Returns:
            :class:`Scores`, one entry per image in input order.

        Raises:
            VigilError: a file that cannot be read (unless loaded with ``skip_bad=True``), an
                array of an unsupported shape or type, or an image the model cannot score.
        """
        if _is_path(images):
            images = [images]
        if isinstance(images, np.ndarray):
            if images.dtype == object:
                images = list(images)
            elif images.ndim == 4:
                images = list(images)
            else:
                images = [images]
        images = list(images)
        if not images:
            raise VigilError("no image to score: give a path, a list of paths or image arrays")
        if all(_is_path(x) for x in images):
            raw = self._native.score_files([os.fspath(p) for p in images])
        elif all(isinstance(x, (bytes, bytearray)) for x in images):
            return self.score_encoded(images)
        elif not any(_is_path(x) for x in images):
            names = [f"array[{i}]" for i in range(len(images))]
            arrays = [_as_image_array(a, n) for a, n in zip(images, names)]
            raw = self._native.score_arrays(arrays, names)
        else:
            raise VigilError("give either paths or image arrays to score, not both in one call")
        return Scores(**raw)

    def score_encoded(self, blobs: Sequence[bytes], names: Optional[Sequence[str]] = None) -> Scores:
        """Scores encoded image files held in memory (PNG, JPEG, TIFF or BMP bytes, e.g. from Ray's
        ``read_binary_files`` or Spark's ``binaryFile``), decoded exactly as vigil decodes the
        files, so JPEG images score as with ``vigil predict`` (other decoders may differ by one
        level). ``names`` (default ``bytes[i]``) are used in messages and :attr:`Scores.names`."""
        blobs = [bytes(b) for b in blobs]
        names = list(names) if names is not None else [f"bytes[{i}]" for i in range(len(blobs))]
        if len(names) != len(blobs):
            raise VigilError(f"{len(blobs)} images but {len(names)} names")
        return Scores(**self._native.score_encoded(blobs, names))

    def save(self, path: PathLike, overwrite: bool = False) -> None:
        """Writes the model file (an existing file is replaced only with ``overwrite=True``)."""
        self._native.save(os.fspath(path), overwrite)

    @property
    def method(self) -> str:
        """The method's name, e.g. ``acontrario``."""
        return self._info["method"]

    @property
    def thresholds(self) -> Dict[str, Any]:
        """The image and pixel thresholds as stored in the model file (``image``, ``pixel``: kind,
        level, value, number of scores they came from), and ``decision``: the value an image's
        decided value is compared with."""
        return {
            "image": self._info["image_threshold"],
            "pixel": self._info["pixel_threshold"],
            "decision": self._info["decision_threshold"],
        }

    @property
    def info(self) -> Dict[str, Any]:
        """Everything the model file says about the model: method, settings, pipeline, thresholds,
        facts of the fit (images, seed, time) and the pretrained weights it uses."""
        return json.loads(json.dumps(self._info))

    def __repr__(self) -> str:
        t = self._info["image_threshold"]
        kind = t["kind"].get("kind") if isinstance(t.get("kind"), dict) else t.get("kind")
        return f"vigil.Model(method={self.method!r}, image threshold ({kind}) {t.get('value')})"


def fit(method: str, train: Optional[PathLike] = None, **settings: Any) -> Model:
    """Fits a model on normal images, as ``vigil fit`` does with the same settings.

    Args:
        method: a method name, optionally with settings (``"acontrario:feature=gabor"``);
            ``vigil methods`` lists them.
        train: normal training images: an MVTec-layout class folder (uses train/good) or a folder.
        **settings: the method's own settings (``feature="gabor"``), fit settings (``threshold``,
            ``pixel_threshold``, ``val_fraction``, ``fit_on_all``, ``seed``, ``checkpoint_dir``,
            ``val_anomalous``, ``val_masks``, ``mask_pattern``) and pipeline settings (``tile``,
            ``overlap``, ``ignore``, ``ignore_mode``, ``register``, ``image_score``, ``skip_bad``,
            ``glob``), with the meanings and defaults of the command line's flags.

    Raises:
        VigilError: an unknown method or setting, a missing folder, an unreadable image.
    """
    return Model(_vigil.fit(method, None if train is None else os.fspath(train), _settings(settings)))


def load(path: PathLike, allow_other_weights: bool = False, **settings: Any) -> Model:
    """Opens a model file written by ``vigil fit`` or :meth:`Model.save`.

    Pipeline settings (``tile``, ``overlap``, ``ignore``, ``ignore_mode``, ``register``,
    ``image_score``, ``skip_bad``) override the model's own, as on ``vigil predict``.
    ``allow_other_weights`` scores even when the pretrained weights differ from those the model was
    fitted with.
    """
    return Model(_vigil.load(os.fspath(path), bool(allow_other_weights), _settings(settings)))
