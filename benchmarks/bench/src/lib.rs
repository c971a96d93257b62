//! Helpers for the speed and memory benchmark programs in `examples/`: where PIPED is, how to load
//! its images, and the peak memory of the process.

use std::path::{Path, PathBuf};

use vigil_core::{Image, Result};

/// `<workspace>/../shared/data/piped`.
pub fn piped_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/piped")
}

/// Sorted image files of a folder.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    vigil_data::io::list_images(dir)
}

/// An RGB image in [0, 1].
pub fn load_rgb(path: &Path) -> Result<Image> {
    Ok(vigil_data::io::load_image(path)?.to_rgb())
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
