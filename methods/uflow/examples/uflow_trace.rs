//! Everything a peer implementation needs to repeat one vigil U-Flow fit step for step: the raw
//! backbone features of a class's train/good and test images, the flow's initial and final state,
//! the image order of every epoch, the latents and log-determinant of the first training batch at
//! the initial state, and the loss per epoch. `benchmarks/uflow_vs_anomalib/uflow_side_by_side.py
//! trace` loads them into anomalib's U-Flow and trains it from the same start on the same batches.
//!
//! cargo run --release -p vigil-uflow --example uflow_trace -- <class dir> <out dir> ['<settings JSON>'] [seed]
//!
//! Writes into `<out dir>`: `features.safetensors` (`train.scale{l}` [N, C, S, S] and
//! `test.scale{l}` [M, C, S, S], raw: before any normalisation), `init.safetensors` and
//! `final.safetensors` (the state as vigil stores it), `first_batch.safetensors` (`z.scale{l}`,
//! `log_det` of the first batch of epoch 0 at the initial state) and `trace.json` (settings, seed,
//! shapes, train and test paths, epoch orders, loss per epoch per latent dimension).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use burn::tensor::{Tensor, TensorData};
use vigil_backbones::Backbone;
use vigil_core::{FitContext, Image, Result, TensorBag, VigilError};
use vigil_flow::TrainableFlow;
use vigil_nn::default_device;
use vigil_nn::train::epoch_order;
use vigil_uflow::detector::{train_flow, TrainingFeatures};
use vigil_uflow::feature_norm::UflowModel;
use vigil_uflow::{FeatureNorm, UflowSettings};

fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| VigilError::file(dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    paths.sort();
    Ok(paths)
}

fn load(path: &Path) -> Result<Image> {
    Ok(vigil_data::load_image(path)?.to_rgb())
}

/// Raw features `[image][scale]` (channel-major) of `paths`.
fn features(backbone: &Backbone, settings: &UflowSettings, paths: &[PathBuf]) -> Result<Vec<Vec<Vec<f32>>>> {
    let size = (settings.input_size, settings.input_size);
    let mut out = Vec::with_capacity(paths.len());
    for chunk in paths.chunks(8) {
        let images = chunk.iter().map(|p| load(p)).collect::<Result<Vec<_>>>()?;
        let maps = backbone.extract(&images, &settings.layers, size)?;
        out.extend(maps.into_iter().map(|per_scale| per_scale.into_iter().map(|m| m.data).collect()));
    }
    Ok(out)
}

fn put_stack(bag: &mut TensorBag, name: &str, values: &[Vec<Vec<f32>>], l: usize, (c, s): (usize, usize)) {
    let data: Vec<f32> = values.iter().flat_map(|image| image[l].iter().copied()).collect();
    bag.put_f32(name, &[values.len(), c, s, s], data);
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| VigilError::file(path, e.to_string()))
}

fn relative(class: &Path, paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| p.strip_prefix(class).unwrap_or(p).to_string_lossy().to_string()).collect()
}

fn run(class: &Path, out: &Path, settings: UflowSettings, seed: u64) -> Result<()> {
    if settings.feature_norm != FeatureNorm::Official || settings.ms_cait.is_some() {
        return Err(VigilError::Config(
            "uflow_trace follows the official CNN path only (feature_norm=official, no ms_cait)".into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| VigilError::file(out, e.to_string()))?;
    let backbone = Backbone::open(settings.backbone, settings.weights.as_deref(), None)?;
    let shapes: Vec<(usize, usize)> = settings
        .layers
        .iter()
        .map(|l| backbone.layer_info(l).map(|(c, stride)| (c, settings.input_size / stride)))
        .collect::<Result<_>>()?;
    let train_paths = images_in(&class.join("train/good"))?;
    let mut test_paths = Vec::new();
    for dir in images_in(&class.join("test"))?.into_iter().filter(|d| d.is_dir()) {
        test_paths.extend(images_in(&dir)?);
    }
    let train = features(&backbone, &settings, &train_paths)?;
    let test = features(&backbone, &settings, &test_paths)?;
    let mut bag = TensorBag::new();
    for (l, &shape) in shapes.iter().enumerate() {
        put_stack(&mut bag, &format!("train.scale{l}"), &train, l, shape);
        put_stack(&mut bag, &format!("test.scale{l}"), &test, l, shape);
    }
    write(&out.join("features.safetensors"), &bag.to_safetensors()?)?;

    // The initial state train_flow starts from (same shapes, steps and seed).
    let device = default_device();
    let init = UflowModel::new(&shapes, true, settings.flow_steps, seed, &device)?;
    let mut bag = TensorBag::new();
    init.save(&mut bag);
    write(&out.join("init.safetensors"), &bag.to_safetensors()?)?;
    let batches_per_epoch = train.len().div_ceil(settings.batch_size);
    let orders: Vec<Vec<usize>> = (0..settings.epochs).map(|e| epoch_order(seed, e, train.len())).collect();
    let first: Vec<usize> = orders[0].iter().copied().take(settings.batch_size).collect();
    let inputs = shapes
        .iter()
        .enumerate()
        .map(|(l, &(c, s))| {
            let data: Vec<f32> = first.iter().flat_map(|&i| train[i][l].iter().copied()).collect();
            Tensor::from_data(TensorData::new(data, [first.len(), c, s, s]), &device)
        })
        .collect();
    let (latents, log_det) = init.forward(inputs, None);
    let mut bag = TensorBag::new();
    for (l, z) in latents.into_iter().enumerate() {
        let dims = z.dims();
        let data = z.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 latents");
        bag.put_f32(&format!("z.scale{l}"), &dims, data);
    }
    let log_det = log_det.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 log-det");
    bag.put_f32("log_det", &[first.len()], log_det);
    write(&out.join("first_batch.safetensors"), &bag.to_safetensors()?)?;

    let ctx = FitContext { seed, checkpoint_dir: None, show_progress: false };
    let data = TrainingFeatures { values: &train, shapes: &shapes, position_weights: None };
    let (model, losses) = train_flow(&settings, &data, &ctx)?;
    let mut bag = TensorBag::new();
    model.save(&mut bag);
    write(&out.join("final.safetensors"), &bag.to_safetensors()?)?;
    let trace = serde_json::json!({
        "settings": settings, "seed": seed, "shapes": shapes, "batches_per_epoch": batches_per_epoch,
        "train": relative(class, &train_paths), "test": relative(class, &test_paths),
        "orders": orders, "epoch_losses": losses,
    });
    write(&out.join("trace.json"), trace.to_string().as_bytes())?;
    println!("{}: {} train, {} test images traced", class.display(), train.len(), test.len());
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: uflow_trace <class dir> <out dir> ['<settings JSON>'] [seed]");
        return ExitCode::FAILURE;
    }
    let settings = match args.get(3) {
        None => Ok(UflowSettings::default()),
        Some(json) => serde_json::from_str::<UflowSettings>(json).map_err(|e| format!("settings: {e}")),
    };
    let seed = match args.get(4).map(|s| s.parse::<u64>()) {
        None => Ok(0),
        Some(Ok(seed)) => Ok(seed),
        Some(Err(e)) => Err(format!("seed {:?}: {e}", args[4])),
    };
    let result = settings.and_then(|s| {
        let seed = seed?;
        run(Path::new(&args[1]), Path::new(&args[2]), s, seed).map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
