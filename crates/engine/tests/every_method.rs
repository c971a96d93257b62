//! Every registered method goes through fit → save → load → score on a small synthetic set, and
//! the loaded model scores exactly as the fitted one.

use std::path::Path;

use vigil_engine::model::LoadOptions;
use vigil_engine::registry::registry;
use vigil_engine::{fit, FitOptions, MethodSpec, Model, PipelineOptions};

const SIZE: u32 = 40;

fn write_images(dir: &Path, n: usize, seed: u32) -> Vec<std::path::PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    (0..n)
        .map(|i| {
            let path = dir.join(format!("{i:03}.png"));
            image::RgbImage::from_fn(SIZE, SIZE, |x, y| {
                // A deterministic texture with a little per-image variation.
                let v = ((x * 7 + y * 13 + (i as u32 + seed) * 31) % 17) as u8 * 6 + 90;
                image::Rgb([v, v.wrapping_add(10), v.wrapping_sub(10)])
            })
            .save(&path)
            .unwrap();
            path
        })
        .collect()
}

/// Small, fast settings per method; the pretrained-feature methods use random backbone weights
/// where they can, U-Flow the shared MobileNetV2 weights.
fn small_settings(name: &str) -> Option<&'static str> {
    Some(match name {
        "acontrario" => "statistics=training,scales=2,patch_size=7,components=8",
        "patchcore" => "random_weights_seed=1,input_size=64",
        "padim" => "random_weights_seed=1,input_size=64",
        "fastflow" => "random_weights_seed=1,input_size=32,epochs=1,flow_steps=2,batch_size=4",
        "stfpm" => "random_weights_seed=1,input_size=32,epochs=1,batch_size=4",
        "csflow" => "random_weights_seed=1,input_size=64,epochs=1,hidden_channels=8,coupling_blocks=2,batch_size=4",
        "cfa" => "random_weights_seed=1,input_size=32,epochs=1,batch_size=4",
        "reverse_distillation" => "random_weights_seed=1,input_size=32,epochs=1,batch_size=4",
        "draem" | "draem-unetpp" => "steps=2,image_size=32,batch=2",
        "ddad" => "random_weights_seed=1,steps=2,batch=2,t_start=50,skip=25",
        "rifa" => "steps=2,batch=2,warmup=1,sde_steps=21,realizations=2,patch_size=16",
        "dad" => r#"steps=2,batch=2,warmup=1,sde_steps=21,nlm_patch_distance=3,ode={"kind":"heun","steps":2}"#,
        "mae" => "input_size=32,patch_size=8,embed_dim=32,depth=1,num_heads=2,decoder_embed_dim=16,decoder_depth=1,decoder_num_heads=2,epochs=2,batch_size=4,ssim_window=7",
        "uflow" => {
            vigil_core::shared_data::shared_path("weights/mobilenet_v2")?;
            "epochs=1,input_size=64,batch_size=4"
        }
        _ => panic!("method '{name}' has no small settings in this test: add them"),
    })
}

#[test]
fn every_registered_method_fits_saves_loads_and_scores_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let train = write_images(&tmp.path().join("train"), 8, 0);
    let test = write_images(&tmp.path().join("test"), 1, 100);
    let image = vigil_data::io::load_image(&test[0]).unwrap();
    for entry in registry() {
        let Some(settings) = small_settings(entry.name) else { continue };
        let spec = MethodSpec::parse(&format!("{}:{settings}", entry.name), &[]).unwrap();
        let opts = FitOptions { val_fraction: 0.25, ..Default::default() };
        let model = fit(&spec, train.clone(), &PipelineOptions::default(), opts)
            .unwrap_or_else(|e| panic!("{}: fit: {e:#}", entry.name));
        let path = tmp.path().join(format!("{}.vigil", entry.name));
        model.save(&path, false).unwrap();
        let loaded = Model::load(&path, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{}: load: {e:#}", entry.name));
        assert_eq!(loaded.method, entry.name);
        assert_eq!(loaded.image_threshold, model.image_threshold, "{}", entry.name);
        let a = model.score(&image, "test").unwrap();
        let b = loaded.score(&image, "test").unwrap();
        assert_eq!(a.map.data, b.map.data, "{}: the loaded model scores differently", entry.name);
        assert_eq!(a.image_score, b.image_score, "{}", entry.name);
        assert_eq!(model.image_verdict(&a), loaded.image_verdict(&b), "{}", entry.name);
    }
}
