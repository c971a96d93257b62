//! Inference time at batch 1:
//! `cargo run --release -p vigil-backbones --example speed [backbone] [size] [layer] [kernels|burn]`.
//! Defaults: mobilenet_v2, 256 px, features.13, the CPU kernels (`burn` times the same network as
//! burn-flex operations). Uses the shipped weights when present, else random ones (the time does not
//! depend on the values).

use std::time::Instant;

use vigil_backbones::{default_weights_path, Backbone, BackboneKind, Engine};
use vigil_core::Image;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let kind: BackboneKind = args.first().map(String::as_str).unwrap_or("mobilenet_v2").parse()?;
    let size: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let backbone = match default_weights_path(kind) {
        Some(path) => Backbone::load(kind, &path)?,
        None => Backbone::random(kind, 0),
    };
    let default_layer = match kind {
        BackboneKind::MobileNetV2 => "features.13",
        BackboneKind::EfficientNetLite0 => "_blocks.10",
        _ => "layer3",
    };
    let layer = args.get(2).cloned().unwrap_or_else(|| default_layer.to_string());
    let engine = match args.get(3).map(String::as_str) {
        None | Some("kernels") => Engine::Kernels,
        Some("burn") => Engine::Burn,
        Some(other) => return Err(format!("unknown engine {other} (kernels or burn)").into()),
    };
    let backbone = backbone.with_engine(engine);
    let data = (0..3 * size * size).map(|i| ((i % 251) as f32) / 250.0).collect();
    let image = Image::new(size, size, 3, data)?;
    let layers = vec![layer.clone()];
    backbone.extract(std::slice::from_ref(&image), &layers, (size, size))?;
    let mut times: Vec<f64> = (0..10)
        .map(|_| {
            let start = Instant::now();
            backbone.extract(std::slice::from_ref(&image), &layers, (size, size)).map(|_| start.elapsed())
        })
        .map(|t| t.map(|d| d.as_secs_f64() * 1e3))
        .collect::<Result<_, _>>()?;
    times.sort_by(f64::total_cmp);
    println!(
        "{kind} up to {layer} ({engine:?}, {} threads), batch 1, {size}x{size}: median {:.1} ms, min {:.1} ms, max {:.1} ms (10 runs)",
        rayon::current_num_threads(),
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );
    Ok(())
}
