//! Test fixtures: small images written into temporary folders, and the shared real data.

use std::path::{Path, PathBuf};

fn make_parent(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
}

/// An RGB 8-bit PNG whose red channel is `value` and whose green/blue vary with the position.
pub fn write_rgb8(path: &Path, w: u32, h: u32, value: u8) {
    make_parent(path);
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([value, (x * 10) as u8, (y * 10) as u8]))
        .save(path)
        .unwrap();
}

/// A gray 8-bit image (format from the extension).
pub fn write_gray8(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> u8) {
    make_parent(path);
    image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)])).save(path).unwrap();
}

/// The shared PIPED class folder, or None when absent (a failure with VIGIL_REQUIRE_SHARED=1).
pub fn piped_class(class: &str) -> Option<PathBuf> {
    vigil_core::shared_data::shared_path(&format!("data/piped/{class}"))
}
