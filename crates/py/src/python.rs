//! The native module `vigil._vigil`: thin PyO3 wrappers around [`crate::api`]. The interpreter
//! lock is released around every computation; arrays come in as NumPy buffers (read in place) and
//! maps and masks go out as NumPy arrays owning the engine's buffers (no copy).

use std::path::PathBuf;

use numpy::ndarray::Array2;
use numpy::{
    IntoPyArray, PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::api::{self, Pixels, Samples, Scoring, Setting};

pyo3::create_exception!(
    _vigil,
    VigilError,
    PyException,
    "An error of vigil: bad input, a file that cannot be read, a setting that does not exist. The message \
     is vigil's own, naming the file and the problem."
);

fn to_py(e: anyhow::Error) -> PyErr {
    VigilError::new_err(format!("{e:#}"))
}

/// A fitted or loaded model (see `vigil.Model`).
#[pyclass(name = "NativeModel", module = "vigil._vigil", frozen)]
struct NativeModel {
    inner: vigil_engine::Model,
}

/// Fits a model (see `vigil.fit`).
#[pyfunction]
#[pyo3(signature = (method, train, settings))]
fn fit(
    py: Python<'_>,
    method: &str,
    train: Option<PathBuf>,
    settings: Vec<Setting>,
) -> PyResult<NativeModel> {
    let model = py.detach(|| api::fit(method, train.as_deref(), &settings)).map_err(to_py)?;
    Ok(NativeModel { inner: model })
}

/// Opens a model file (see `vigil.load`).
#[pyfunction]
#[pyo3(signature = (path, allow_other_weights, settings))]
fn load(
    py: Python<'_>,
    path: PathBuf,
    allow_other_weights: bool,
    settings: Vec<Setting>,
) -> PyResult<NativeModel> {
    let model = py.detach(|| api::load(&path, allow_other_weights, &settings)).map_err(to_py)?;
    Ok(NativeModel { inner: model })
}

/// Sets the number of worker threads of this process (see `vigil.set_threads`).
#[pyfunction]
fn set_threads(threads: usize) -> PyResult<()> {
    if threads == 0 {
        return Err(VigilError::new_err("threads must be at least 1"));
    }
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().map_err(|e| {
        VigilError::new_err(format!(
            "the thread count can be set once per process, before the first computation ({e}); this process \
             uses {} threads",
            rayon::current_num_threads()
        ))
    })
}

/// The number of worker threads this process computes with.
#[pyfunction]
fn threads() -> usize {
    rayon::current_num_threads()
}

fn results<'py>(
    py: Python<'py>,
    model: &vigil_engine::Model,
    scorings: Vec<Scoring>,
    skipped: Vec<(String, String)>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("names", scorings.iter().map(|s| s.name.clone()).collect::<Vec<_>>())?;
    d.set_item("scores", PyArray1::from_vec(py, scorings.iter().map(|s| s.score).collect()))?;
    d.set_item("decided_values", PyArray1::from_vec(py, scorings.iter().map(|s| s.decided).collect()))?;
    d.set_item("verdicts", PyArray1::from_vec(py, scorings.iter().map(|s| s.verdict).collect()))?;
    let (mut maps, mut masks) = (Vec::new(), Vec::new());
    for s in scorings {
        let (h, w) = (s.map.height, s.map.width);
        let map = Array2::from_shape_vec((h, w), s.map.data).expect("a map holds width x height values");
        let mask = Array2::from_shape_vec((h, w), s.mask.data).expect("a mask holds width x height values");
        maps.push(map.into_pyarray(py));
        masks.push(mask.into_pyarray(py));
    }
    d.set_item("maps", maps)?;
    d.set_item("masks", masks)?;
    d.set_item("skipped", skipped)?;
    d.set_item("threshold", api::decision_threshold(model))?;
    Ok(d)
}

#[pymethods]
impl NativeModel {
    /// Scores image files (see `vigil.Model.score`).
    fn score_files<'py>(&self, py: Python<'py>, paths: Vec<PathBuf>) -> PyResult<Bound<'py, PyDict>> {
        let (scorings, skipped) = py.detach(|| api::score_files(&self.inner, &paths)).map_err(to_py)?;
        let skipped = skipped.into_iter().map(|s| (s.path.display().to_string(), s.reason)).collect();
        results(py, &self.inner, scorings, skipped)
    }

    /// Scores (H, W, C) C-contiguous arrays of uint8, uint16, float32 or float64 (see `vigil.Model.score`).
    fn score_arrays<'py>(
        &self,
        py: Python<'py>,
        arrays: Vec<Bound<'py, PyAny>>,
        names: Vec<String>,
    ) -> PyResult<Bound<'py, PyDict>> {
        enum Held<'py> {
            U8(PyReadonlyArray3<'py, u8>),
            U16(PyReadonlyArray3<'py, u16>),
            F32(PyReadonlyArray3<'py, f32>),
            F64(PyReadonlyArray3<'py, f64>),
        }
        let mut held = Vec::with_capacity(arrays.len());
        for (a, name) in arrays.iter().zip(&names) {
            let h = if let Ok(x) = a.extract::<PyReadonlyArray3<u8>>() {
                Held::U8(x)
            } else if let Ok(x) = a.extract::<PyReadonlyArray3<u16>>() {
                Held::U16(x)
            } else if let Ok(x) = a.extract::<PyReadonlyArray3<f32>>() {
                Held::F32(x)
            } else if let Ok(x) = a.extract::<PyReadonlyArray3<f64>>() {
                Held::F64(x)
            } else {
                return Err(VigilError::new_err(format!(
                    "{name}: not an image array: give (H, W) or (H, W, C) arrays of uint8, uint16 or float in [0, 1]"
                )));
            };
            held.push(h);
        }
        let not_contiguous =
            |name: &str| VigilError::new_err(format!("{name}: the array is not C-contiguous"));
        let mut pixels = Vec::with_capacity(held.len());
        for (h, name) in held.iter().zip(&names) {
            let (shape, samples) = match h {
                Held::U8(x) => {
                    (x.shape().to_vec(), Samples::U8(x.as_slice().map_err(|_| not_contiguous(name))?))
                }
                Held::U16(x) => {
                    (x.shape().to_vec(), Samples::U16(x.as_slice().map_err(|_| not_contiguous(name))?))
                }
                Held::F32(x) => {
                    (x.shape().to_vec(), Samples::F32(x.as_slice().map_err(|_| not_contiguous(name))?))
                }
                Held::F64(x) => {
                    (x.shape().to_vec(), Samples::F64(x.as_slice().map_err(|_| not_contiguous(name))?))
                }
            };
            pixels.push(Pixels { height: shape[0], width: shape[1], channels: shape[2], samples });
        }
        let model = &self.inner;
        let scorings = py
            .detach(|| -> anyhow::Result<Vec<Scoring>> {
                let images = pixels
                    .iter()
                    .zip(&names)
                    .map(|(p, name)| Ok((name.clone(), api::image_from_pixels(p, name)?)))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                api::score_images(model, &images)
            })
            .map_err(to_py)?;
        results(py, model, scorings, Vec::new())
    }

    /// Scores encoded image files held in memory (see `vigil.Model.score_encoded`).
    fn score_encoded<'py>(
        &self,
        py: Python<'py>,
        blobs: Vec<Bound<'py, PyBytes>>,
        names: Vec<String>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let pairs: Vec<(String, &[u8])> = names.into_iter().zip(blobs.iter().map(|b| b.as_bytes())).collect();
        let scorings = py.detach(|| api::score_encoded(&self.inner, &pairs)).map_err(to_py)?;
        results(py, &self.inner, scorings, Vec::new())
    }

    /// Writes the model file.
    #[pyo3(signature = (path, overwrite=false))]
    fn save(&self, py: Python<'_>, path: PathBuf, overwrite: bool) -> PyResult<()> {
        py.detach(|| self.inner.save(&path, overwrite)).map_err(to_py)
    }

    /// The model's description as JSON: method, settings, thresholds, pipeline, fit facts, weights.
    fn info_json(&self) -> PyResult<String> {
        let m = &self.inner;
        let info = serde_json::json!({
            "method": m.method,
            "settings": m.settings,
            "pipeline": m.pipeline.settings,
            "image_threshold": m.image_threshold,
            "pixel_threshold": m.pixel_threshold,
            "decision_threshold": api::decision_threshold(m),
            "fit": m.fit_info,
            "weights": m.weights,
        });
        serde_json::to_string(&info).map_err(|e| VigilError::new_err(e.to_string()))
    }
}

fn metric<T>(py: Python<'_>, f: impl FnOnce() -> vigil_core::Result<T> + Send, what: &str) -> PyResult<T>
where
    T: Send,
{
    py.detach(f).map_err(|e| VigilError::new_err(format!("{what}: {e}")))
}

/// Image-level AUROC (see `vigil.metrics.auroc`).
#[pyfunction]
fn auroc(py: Python<'_>, scores: PyReadonlyArray1<f64>, labels: PyReadonlyArray1<bool>) -> PyResult<f64> {
    let (s, l) = (scores.as_slice()?, labels.as_slice()?);
    metric(py, || vigil_metrics::roc_auc(s, l), "auroc")
}

/// Average precision (see `vigil.metrics.average_precision`).
#[pyfunction]
fn average_precision(
    py: Python<'_>,
    scores: PyReadonlyArray1<f64>,
    labels: PyReadonlyArray1<bool>,
) -> PyResult<f64> {
    let (s, l) = (scores.as_slice()?, labels.as_slice()?);
    metric(py, || vigil_metrics::average_precision(s, l), "average_precision")
}

/// The best F1 and its threshold (see `vigil.metrics.f1_max`).
#[pyfunction]
fn f1_max(
    py: Python<'_>,
    scores: PyReadonlyArray1<f64>,
    labels: PyReadonlyArray1<bool>,
) -> PyResult<(f64, f64)> {
    let (s, l) = (scores.as_slice()?, labels.as_slice()?);
    metric(py, || vigil_metrics::f1_max(s, l), "f1_max")
}

/// Maps, masks and their (width, height), as vigil-metrics takes them.
type Planes<'a> = (Vec<&'a [f32]>, Vec<&'a [bool]>, Vec<(usize, usize)>);

fn slices<'a>(
    maps: &'a [PyReadonlyArray2<'_, f32>],
    masks: &'a [PyReadonlyArray2<'_, bool>],
) -> PyResult<Planes<'a>> {
    if maps.len() != masks.len() {
        return Err(VigilError::new_err(format!("{} maps but {} masks", maps.len(), masks.len())));
    }
    let mut sizes = Vec::new();
    for (i, (m, g)) in maps.iter().zip(masks).enumerate() {
        if m.shape() != g.shape() {
            return Err(VigilError::new_err(format!(
                "map {i} is {:?} but its mask is {:?} (height, width)",
                m.shape(),
                g.shape()
            )));
        }
        sizes.push((m.shape()[1], m.shape()[0]));
    }
    let m = maps.iter().map(|m| m.as_slice()).collect::<Result<Vec<_>, _>>()?;
    let g = masks.iter().map(|g| g.as_slice()).collect::<Result<Vec<_>, _>>()?;
    Ok((m, g, sizes))
}

/// Pixel-level AUROC over all pixels of all maps (see `vigil.metrics.pixel_auroc`).
#[pyfunction]
fn pixel_auroc(
    py: Python<'_>,
    maps: Vec<PyReadonlyArray2<'_, f32>>,
    masks: Vec<PyReadonlyArray2<'_, bool>>,
) -> PyResult<f64> {
    let (m, g, _) = slices(&maps, &masks)?;
    let scores: Vec<f32> = m.iter().flat_map(|s| s.iter().copied()).collect();
    let labels: Vec<bool> = g.iter().flat_map(|s| s.iter().copied()).collect();
    metric(py, || vigil_metrics::roc_auc(&scores, &labels), "pixel_auroc")
}

/// AUPRO up to an FPR limit (see `vigil.metrics.aupro`).
#[pyfunction]
fn aupro(
    py: Python<'_>,
    maps: Vec<PyReadonlyArray2<'_, f32>>,
    masks: Vec<PyReadonlyArray2<'_, bool>>,
    fpr_limit: f64,
) -> PyResult<f64> {
    let (m, g, sizes) = slices(&maps, &masks)?;
    metric(py, || vigil_metrics::aupro(&m, &g, &sizes, fpr_limit), "aupro")
}

/// Mean IoU of maps thresholded at one value (see `vigil.metrics.mean_iou_at`).
#[pyfunction]
fn mean_iou_at(
    py: Python<'_>,
    maps: Vec<PyReadonlyArray2<'_, f32>>,
    masks: Vec<PyReadonlyArray2<'_, bool>>,
    threshold: f64,
) -> PyResult<f64> {
    let (m, g, _) = slices(&maps, &masks)?;
    metric(py, || vigil_metrics::mean_iou_at(&m, &g, threshold), "mean_iou_at")
}

#[pymodule]
fn _vigil(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Progress bars are for the terminal command; a library prints none.
    vigil_engine::progress::set_mode(vigil_engine::progress::ProgressMode::None);
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("VigilError", m.py().get_type::<VigilError>())?;
    m.add_class::<NativeModel>()?;
    for f in [
        wrap_pyfunction!(fit, m)?,
        wrap_pyfunction!(load, m)?,
        wrap_pyfunction!(set_threads, m)?,
        wrap_pyfunction!(threads, m)?,
        wrap_pyfunction!(auroc, m)?,
        wrap_pyfunction!(average_precision, m)?,
        wrap_pyfunction!(f1_max, m)?,
        wrap_pyfunction!(pixel_auroc, m)?,
        wrap_pyfunction!(aupro, m)?,
        wrap_pyfunction!(mean_iou_at, m)?,
    ] {
        m.add_function(f)?;
    }
    Ok(())
}
