//! A checkpoint folder is tied to the images it was trained on: a fit on another folder is
//! refused (naming both), the same fit reuses the finished run.

use std::path::{Path, PathBuf};

use vigil_core::{ChannelMode, Detector, FitContext, Map};
use vigil_data::{write_map_png16, FileSource, SourceOptions};
use vigil_draem::{DraemDetector, DraemSettings, Variant};

const SIZE: usize = 32;

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

fn settings() -> DraemSettings {
    DraemSettings {
        image_size: SIZE,
        steps: 4,
        batch: 2,
        checkpoint_every: 2,
        ..DraemSettings::cpu(Variant::Draem)
    }
}

fn fit(paths: &[PathBuf], ctx: &FitContext) -> vigil_core::Result<DraemDetector> {
    let source = FileSource::open(paths, SourceOptions::new(ChannelMode::Rgb))?;
    let mut detector = DraemDetector::new(settings())?;
    detector.fit(&source, ctx)?;
    Ok(detector)
}

#[test]
fn checkpoint_of_another_data_set_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let class_a = write_class(&dir.path().join("class-a"), 3.0);
    let class_b = write_class(&dir.path().join("class-b"), 5.0);
    let ctx = FitContext { seed: 2, checkpoint_dir: Some(dir.path().join("ckpt")), ..Default::default() };

    let first = fit(&class_a, &ctx).unwrap();
    let Err(err) = fit(&class_b, &ctx) else { panic!("class B must not reuse class A's checkpoint") };
    let err = err.to_string();
    assert!(
        err.contains("draem-training.ckpt") && err.contains("class-a") && err.contains("class-b"),
        "{err}"
    );

    // The same fit again reuses the finished run: the same network, bit for bit.
    let again = fit(&class_a, &ctx).unwrap();
    assert_eq!(again.state().unwrap(), first.state().unwrap());
}
