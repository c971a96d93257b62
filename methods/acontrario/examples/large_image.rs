//! Time and memory check on one large synthetic RGB image (both features, thesis defaults).
//!
//! /usr/bin/time -v cargo run --release -p vigil-acontrario --example large_image -- 1024

use vigil_acontrario::{AcontrarioDetector, AcontrarioSettings, Feature};
use vigil_core::{Detector, Image};
fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1024);
    // a deterministic pseudo-random texture
    let data: Vec<f32> = (0..n * n * 3).map(|i| ((i * 7919) % 1009) as f32 / 1009.0).collect();
    let image = Image::new(n, n, 3, data).expect("sizes match");
    for feature in [Feature::Pca, Feature::Gabor] {
        let det = AcontrarioDetector::new(AcontrarioSettings { feature, ..Default::default() });
        let t = std::time::Instant::now();
        let out = det.score(&image, None).expect("scoring a valid image");
        println!("{feature:?} {n}x{n}: {:?}, max {}", t.elapsed(), out.map.max());
    }
}
