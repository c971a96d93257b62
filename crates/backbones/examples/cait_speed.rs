//! Inference time of U-Flow's CaiT trunks at batch 1:
//! `cargo run --release -p vigil-backbones --example cait_speed [s24 | m48 | ms]` (default s24).
//! `s24` is cait_s24_224 up to block 20 at 224 px, `m48` cait_m48_448 up to block 40 at 448 px,
//! `ms` the whole MS-CaiT extractor (both). Uses `cait_m48_448` / `cait_s24_224` weights from the
//! weights folder when present, else random ones (the time does not depend on the values; random
//! M48 weights take about 3.5 GB while they are drawn).

use std::time::Instant;

use burn::tensor::Tensor;
use vigil_backbones::{Cait, CaitConfig, MsCait, CAIT_M48_448, CAIT_S24_224};
use vigil_core::Image;

fn trunks(m48: bool) -> Result<(Option<Cait>, Cait), Box<dyn std::error::Error>> {
    let (m48_config, s24_config) = (CaitConfig::m48_448(), CaitConfig::s24_224());
    if let Some((m48_path, s24_path)) = MsCait::default_weights_paths() {
        println!("weights: {} and {}", m48_path.display(), s24_path.display());
        let fine = if m48 { Some(Cait::load(&m48_config, &m48_path)?) } else { None };
        return Ok((fine, Cait::load(&s24_config, &s24_path)?));
    }
    println!("no {CAIT_M48_448} / {CAIT_S24_224} weights: random ones");
    let fine = if m48 { Some(Cait::random(&m48_config, 0)?) } else { None };
    Ok((fine, Cait::random(&s24_config, 1)?))
}

/// Median and minimum wall time of `run` over 3 runs after a warm-up, in ms.
fn time(
    mut run: impl FnMut() -> Result<(), Box<dyn std::error::Error>>,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    run()?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        run()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[1], times[0]))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "s24".into());
    if !["s24", "m48", "ms"].contains(&which.as_str()) {
        return Err(format!("unknown choice '{which}' (s24, m48 or ms)").into());
    }
    let start = Instant::now();
    let (fine, coarse) = trunks(which != "s24")?;
    println!("built in {:.1} s", start.elapsed().as_secs_f64());
    let image_of = |size: usize| {
        let data = (0..3 * size * size).map(|i| ((i % 251) as f32) / 250.0).collect();
        Image::new(size, size, 3, data)
    };
    let (median, min) = match (which.as_str(), fine) {
        ("ms", Some(fine)) => {
            let extractor = MsCait::new(fine, coarse)?;
            let image = image_of(extractor.input_size())?;
            time(|| {
                extractor.extract(std::slice::from_ref(&image))?;
                Ok(())
            })?
        }
        (_, trunk) => {
            let trunk = trunk.unwrap_or(coarse);
            let size = trunk.config().image_size;
            let data: Vec<f32> = image_of(size)?.data;
            let batch = || {
                Tensor::<4>::from_data(
                    burn::tensor::TensorData::new(data.clone(), [1, 3, size, size]),
                    trunk.device(),
                )
            };
            time(|| {
                trunk.feature_map(batch())?.into_data();
                Ok(())
            })?
        }
    };
    println!("{which}, batch 1: median {median:.0} ms, min {min:.0} ms (3 runs after a warm-up)");
    Ok(())
}
