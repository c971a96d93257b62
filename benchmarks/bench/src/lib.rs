//! Helpers for the benchmark programs in `examples/`: where PIPED is, how to load its images, a
//! method spec from settings given as JSON, and the peak memory of the process.

use std::path::{Path, PathBuf};

use vigil_core::{Image, Result, VigilError};
use vigil_engine::MethodSpec;

/// `<workspace>/../shared/data/piped`.
pub fn piped_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/piped")
}

/// The PIPED class folders (with train/good), sorted; only those named in `only` when it is not
/// empty (an unknown name is an error).
pub fn piped_classes(only: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    let root = piped_root();
    let mut classes = vigil_data::dataset::list_classes(&root)?;
    if !only.is_empty() {
        for name in only {
            if !classes.iter().any(|c| c.file_name().is_some_and(|n| n == name.as_str())) {
                anyhow::bail!("{name}: not a class folder (with train/good) under {}", root.display());
            }
        }
        classes.retain(|c| c.file_name().is_some_and(|n| only.iter().any(|o| n == o.as_str())));
    }
    Ok(classes)
}

/// A metric the table needs, or an error naming it and the class.
pub fn required(value: Option<f64>, metric: &str, class: &str) -> anyhow::Result<f64> {
    value.ok_or_else(|| anyhow::anyhow!("{class}: {metric} is undefined"))
}

/// Sorted image files of a folder.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    vigil_data::io::list_images(dir)
}

/// An RGB image in [0, 1].
pub fn load_rgb(path: &Path) -> Result<Image> {
    Ok(vigil_data::io::load_image(path)?.to_rgb())
}

/// The spec of `method` with `settings`, a JSON object as text, overriding its defaults key by key.
pub fn method_spec(method: &str, settings: &str) -> anyhow::Result<MethodSpec> {
    let settings: serde_json::Value = serde_json::from_str(settings)
        .map_err(|e| VigilError::Config(format!("settings {settings}: {e}")))?;
    let object = settings
        .as_object()
        .ok_or_else(|| VigilError::Config(format!("settings: a JSON object is expected, got {settings}")))?;
    let params: Vec<String> = object.iter().map(|(key, value)| format!("{key}={value}")).collect();
    MethodSpec::parse(method, &params)
}

/// Peak resident memory of this process so far (VmHWM), in MiB.
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The value after `--name` on the command line.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}
