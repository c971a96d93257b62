//! What ties a U-Flow fit to its inputs: the checkpoint to the training images, the model to the
//! backbone weights file.

use std::path::{Path, PathBuf};

use vigil_backbones::{write_state, Backbone, BackboneKind};
use vigil_core::fingerprint::check_weights;
use vigil_core::{ChannelMode, Detector, FitContext, Map, WeightsFile};
use vigil_data::{write_map_png16, FileSource, SourceOptions};
use vigil_uflow::{UflowDetector, UflowSettings};

const SIZE: usize = 64;

/// Four gray stripe images whose period depends on `period`.
fn write_class(dir: &Path, period: f32) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    (0..4)
        .map(|k| {
            let data = (0..SIZE * SIZE)
                .map(|i| 0.5 + 0.4 * (((i % SIZE) as f32 + k as f32) / period).sin())
                .collect();
            let path = dir.join(format!("{k}.png"));
            write_map_png16(&path, &Map::new(SIZE, SIZE, data).unwrap(), 0.0, 1.0).unwrap();
            path
        })
        .collect()
}

/// A MobileNetV2 weights file of seeded random values (no shared weights needed).
fn write_weights(path: &Path) {
    write_state(&Backbone::random_state(BackboneKind::MobileNetV2, 4), path).unwrap();
}

fn settings(weights: &Path) -> UflowSettings {
    UflowSettings {
        weights: Some(weights.to_path_buf()),
        input_size: SIZE,
        flow_steps: 1,
        epochs: 2,
        batch_size: 2,
        checkpoint_every: 1,
        ..UflowSettings::default()
    }
}

fn fit(settings: &UflowSettings, paths: &[PathBuf], ctx: &FitContext) -> vigil_core::Result<UflowDetector> {
    let source = FileSource::open(paths, SourceOptions::new(ChannelMode::Rgb))?;
    let mut detector = UflowDetector::new(settings.clone());
    detector.fit(&source, ctx)?;
    Ok(detector)
}

#[test]
fn checkpoint_of_another_data_set_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("mobilenet_v2.safetensors");
    write_weights(&weights);
    let settings = settings(&weights);
    let class_a = write_class(&dir.path().join("class-a"), 3.0);
    let class_b = write_class(&dir.path().join("class-b"), 5.0);
    let ctx = FitContext { seed: 2, checkpoint_dir: Some(dir.path().join("ckpt")), ..Default::default() };

    let first = fit(&settings, &class_a, &ctx).unwrap();
    let err = fit(&settings, &class_b, &ctx).err().expect("class B must not reuse class A's checkpoint");
    let err = err.to_string();
    assert!(err.contains("uflow-train.ckpt") && err.contains("class-a") && err.contains("class-b"), "{err}");

    // The same fit again reuses the finished run: the same flow, bit for bit.
    let again = fit(&settings, &class_a, &ctx).unwrap();
    assert_eq!(again.state().unwrap(), first.state().unwrap());
}

#[test]
fn a_changed_weights_file_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("mobilenet_v2.safetensors");
    write_weights(&weights);
    let settings = settings(&weights);
    let class = write_class(&dir.path().join("class"), 3.0);
    let fitted = fit(&settings, &class, &FitContext::default()).unwrap();
    let recorded = fitted.weights_files();
    assert_eq!(recorded, vec![WeightsFile::read(&weights).unwrap()]);

    let model = Path::new("uflow.vigil");
    let reload =
        || UflowDetector::load(&fitted.settings(), &fitted.state().unwrap()).unwrap().weights_files();
    check_weights(model, &recorded, &reload(), false).unwrap();

    // One value of one convolution changed, same file name.
    let mut state = Backbone::random_state(BackboneKind::MobileNetV2, 4);
    let name = "features.0.0.weight";
    let mut values = state.f32(name, None).unwrap();
    values[0] += 0.5;
    let shape = state.shape(name).unwrap().to_vec();
    state.put_f32(name, &shape, values);
    write_state(&state, &weights).unwrap();
    let now = reload();
    let err = check_weights(model, &recorded, &now, false).unwrap_err().to_string();
    assert!(
        err.contains("uflow.vigil") && err.contains(&recorded[0].sha256) && err.contains(&now[0].sha256),
        "{err}"
    );
    assert!(err.contains("mobilenet_v2.safetensors") && err.contains("--allow-other-weights"), "{err}");
    check_weights(model, &recorded, &now, true).unwrap();
}
