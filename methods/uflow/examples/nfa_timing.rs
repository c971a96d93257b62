//! Times the max-tree NFA segmentation on latents of the paper's shape (816 × 28 × 28 and
//! 192 × 14 × 14, χ² sums drawn under H0 plus one anomalous blob), up-sampled to 448 × 448.
//!
//! cargo run --release -p vigil-uflow --example nfa_timing

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vigil_core::Map;
use vigil_nfa::maxtree::{tree_log10_nfa, Chi2Map};

/// Σ of `dof` squared standard normals per pixel (Box–Muller), `blob_factor` times larger in a
/// square of side `side / 7` in the middle.
fn chi2_map(side: usize, dof: usize, blob_factor: f32, rng: &mut ChaCha8Rng) -> Chi2Map {
    let blob = side / 7;
    let lo = side / 2 - blob / 2;
    let data = (0..side * side)
        .map(|i| {
            let sum: f32 = (0..dof)
                .map(|_| {
                    let (u1, u2): (f32, f32) = (rng.gen_range(1e-7..1.0), rng.gen());
                    let z = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
                    z * z
                })
                .sum();
            let (x, y) = (i % side, i / side);
            let inside = (lo..lo + blob).contains(&x) && (lo..lo + blob).contains(&y);
            if inside {
                sum * blob_factor
            } else {
                sum
            }
        })
        .collect();
    Chi2Map { u: Map::new(side, side, data).unwrap(), dof }
}

fn main() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let runs = 50;
    let maps: Vec<[Chi2Map; 2]> =
        (0..runs).map(|_| [chi2_map(28, 816, 2.5, &mut rng), chi2_map(14, 192, 2.5, &mut rng)]).collect();
    let start = Instant::now();
    let mut detected = 0usize;
    for scales in &maps {
        let nfa = tree_log10_nfa(scales, 448, 448).unwrap();
        detected += nfa.data.iter().filter(|&&v| v <= 0.0).count();
    }
    let per_image = start.elapsed().as_secs_f64() * 1e3 / runs as f64;
    println!("tree NFA, 28x28x816 + 14x14x192 -> 448x448: {per_image:.2} ms per image");
    println!("mean detected pixels per image: {}", detected / runs);
}
