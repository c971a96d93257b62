//! MAE with a sliding mask as a vigil [`Detector`]: every patch is hidden in one of the s²
//! passes with its neighbours visible, the MAE reconstructs it, and the anomaly map is the SSIM +
//! L1 discrepancy between the image and the composite reconstruction (smoothed, opened); the
//! image score is the map's mean (seed 002).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use vigil_core::{
    ChannelMode, Detector, FitContext, Image, ImageSource, Mask, Result, ScoreOutput, TensorBag, VigilError,
    WeightsFile,
};

use crate::anomaly::{anomaly_map, mean_score, MapRecipe};
use crate::model::{init_state, Mae};
use crate::settings::MaeSettings;
use crate::sliding::reconstruct_all;
use crate::train::{pretrain, TrainingData};

/// ImageNet normalisation of the official pre-training and visualisation.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Images per forward pass at scoring time.
const SCORE_BATCH: usize = 8;

/// The image resized to `side` (bilinear) and ImageNet-normalised, channel-major.
pub fn preprocess(image: &Image, side: usize) -> Result<Vec<f32>> {
    if image.channels != 3 {
        return Err(VigilError::invalid(format!("mae: expects RGB images, got {} channels", image.channels)));
    }
    let resized = if (image.width, image.height) == (side, side) {
        image.clone()
    } else {
        image.resize_bilinear(side, side)
    };
    let plane = side * side;
    Ok(resized.data.iter().enumerate().map(|(i, &v)| (v - MEAN[i / plane]) / STD[i / plane]).collect())
}

/// Normalised values back to [0, 1] (clamped, as the official visualisation does).
fn denormalise(values: &[f32], side: usize) -> Vec<f32> {
    let plane = side * side;
    values.iter().enumerate().map(|(i, &v)| (v * STD[i / plane] + MEAN[i / plane]).clamp(0.0, 1.0)).collect()
}

/// A state dict from a file, and the prefix its MAE tensors carry ("model." for the official
/// `.pth`, which keeps them under "model").
fn read_weights(path: &Path) -> Result<(TensorBag, &'static str)> {
    let state = vigil_backbones::read_state(path)?;
    let prefix = if state.shape("model.patch_embed.proj.weight").is_ok() { "model." } else { "" };
    if state.shape(&format!("{prefix}patch_embed.proj.weight")).is_err() {
        return Err(VigilError::file(
            path,
            "holds no MAE (no 'patch_embed.proj.weight' or 'model.patch_embed.proj.weight')",
        ));
    }
    // Only the MAE's own tensors: an official checkpoint may carry other entries beside "model".
    let mut only = TensorBag::new();
    for name in state.names().filter(|n| n.starts_with(prefix)) {
        only.put_f32(name, state.shape(name)?, state.f32(name, None)?);
    }
    Ok((only, prefix))
}

/// MAE with a sliding mask: [`Detector`] with method name "mae".
pub struct MaeDetector {
    settings: MaeSettings,
    mae: Option<Mae>,
    /// The trained or random state (None with pretrained weights from a file: that file is the
    /// state, recorded by [`Detector::weights_files`]).
    state: Option<TensorBag>,
    weights_file: Option<WeightsFile>,
    /// Mean training loss of each epoch of the last fit (empty when nothing was trained).
    pub loss_history: Vec<f32>,
}

impl MaeDetector {
    pub fn new(settings: MaeSettings) -> Result<Self> {
        settings.validate()?;
        Ok(MaeDetector { settings, mae: None, state: None, weights_file: None, loss_history: Vec::new() })
    }

    /// Rebuilds a fitted model from [`Detector::settings`] and [`Detector::state`].
    pub fn load(settings: &serde_json::Value, state: &TensorBag) -> Result<Self> {
        let settings: MaeSettings = serde_json::from_value(settings.clone())
            .map_err(|e| VigilError::Model(format!("mae settings: {e}")))?;
        let mut detector = MaeDetector::new(settings)?;
        match detector.settings.weights.clone() {
            Some(path) if state.names().next().is_none() => detector.open_weights(&path)?,
            _ => {
                let mae = Mae::from_state(&detector.settings.arch(), state, "", &Device::flex())
                    .map_err(|e| VigilError::Model(format!("mae network: {e}")))?;
                detector.mae = Some(mae);
                detector.state = Some(state.clone());
            }
        }
        Ok(detector)
    }

    pub fn settings_struct(&self) -> &MaeSettings {
        &self.settings
    }

    fn open_weights(&mut self, path: &PathBuf) -> Result<()> {
        let (state, prefix) = read_weights(path)?;
        let mae = Mae::from_state(&self.settings.arch(), &state, prefix, &Device::flex())
            .map_err(|e| VigilError::file(path, format!("does not fit the configured MAE: {e}")))?;
        self.mae = Some(mae);
        self.state = None;
        self.weights_file = Some(WeightsFile::read(path)?);
        Ok(())
    }

    fn fitted(&self) -> Result<&Mae> {
        self.mae.as_ref().ok_or_else(|| VigilError::Model("mae: score called before fit or load".into()))
    }

    /// The composite sliding-mask reconstructions of `images` (normalised), de-normalised to
    /// [0, 1], with the de-normalised inputs.
    pub fn reconstruct(&self, images: &[Image]) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        let mae = self.fitted()?;
        let s = &self.settings;
        let side = s.input_size;
        let inputs = images.iter().map(|i| preprocess(i, side)).collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(images.len());
        for chunk in inputs.chunks(SCORE_BATCH) {
            let recon =
                reconstruct_all(mae, &s.arch(), chunk, s.mask_stride, s.norm_pix_loss, s.shifted_grids)?;
            for (x, r) in chunk.iter().zip(recon) {
                out.push((denormalise(x, side), denormalise(&r, side)));
            }
        }
        Ok(out)
    }

    fn recipe(&self) -> MapRecipe {
        let s = &self.settings;
        MapRecipe {
            ssim_window: s.ssim_window,
            alpha: s.alpha,
            smoothing_sigma: s.smoothing_sigma,
            morphology: s.morphology,
        }
    }
}

impl Detector for MaeDetector {
    fn method(&self) -> &'static str {
        "mae"
    }

    fn channel_mode(&self) -> ChannelMode {
        ChannelMode::Rgb
    }

    fn weights_files(&self) -> Vec<WeightsFile> {
        self.weights_file.iter().cloned().collect()
    }

    fn fit(&mut self, train: &dyn ImageSource, ctx: &FitContext) -> Result<()> {
        self.settings.validate()?;
        self.loss_history.clear();
        if let Some(path) = self.settings.weights.clone() {
            // A pretrained MAE: nothing is fitted (the seed's method needs no training).
            return self.open_weights(&path);
        }
        let arch = self.settings.arch();
        if let Some(seed) = self.settings.random_weights_seed {
            let state = init_state(&arch, seed)?;
            self.mae = Some(Mae::from_state(&arch, &state, "", &Device::flex())?);
            self.state = Some(state);
            return Ok(());
        }
        if train.is_empty() {
            return Err(VigilError::invalid("mae: no training images"));
        }
        let side = self.settings.input_size;
        let mut images = Vec::with_capacity(train.len());
        let mut ignored = Vec::with_capacity(train.len());
        let mut any_mask = false;
        for i in 0..train.len() {
            let image = train.load(i)?;
            let mask = train.ignore_mask(i);
            let plane = match &mask {
                Some(m) if (m.width, m.height) != (image.width, image.height) => {
                    return Err(VigilError::invalid(format!(
                        "mae: training image {i} is {}x{} but its ignore mask is {}x{}",
                        image.width, image.height, m.width, m.height
                    )));
                }
                Some(m) => {
                    any_mask = true;
                    let values: Vec<f32> = m.data.iter().map(|&b| f32::from(u8::from(b))).collect();
                    let as_image = Image::new(m.width, m.height, 1, values)?;
                    as_image.resize_bilinear(side, side).data
                }
                None => vec![0f32; side * side],
            };
            images.push(preprocess(&image, side)?);
            ignored.push(plane);
        }
        let data = TrainingData { images: &images, ignored: any_mask.then_some(ignored.as_slice()) };
        let training_set = ctx.checkpoint_dir.as_ref().map(|_| train.fingerprint()).transpose()?;
        let (state, losses) = pretrain(&self.settings, &data, ctx, None, training_set)?;
        self.mae = Some(Mae::from_state(&arch, &state, "", &Device::flex())?);
        self.state = Some(state);
        self.loss_history = losses;
        Ok(())
    }

    fn score(&self, image: &Image, ignore: Option<&Mask>) -> Result<ScoreOutput> {
        if let Some(mask) = ignore {
            mask.check_fits(image, "mae")?;
        }
        let side = self.settings.input_size;
        let (x, recon) = self.reconstruct(std::slice::from_ref(image))?.pop().expect("one image in, one out");
        let map = anomaly_map(&x, &recon, side, &self.recipe()).resize_bilinear(image.width, image.height);
        map.check_finite("mae")?;
        let image_score = mean_score(&map, ignore);
        Ok(ScoreOutput { map, image_score: Some(image_score), log10_nfa: None })
    }

    fn settings(&self) -> serde_json::Value {
        self.settings.complete()
    }

    fn state(&self) -> Result<TensorBag> {
        self.fitted()?;
        Ok(self.state.clone().unwrap_or_default())
    }
}
