//! U-Flow as a vigil [`Detector`]: frozen backbone features at several scales, the U-shaped flow
//! trained on normal images, the likelihood anomaly map and the a contrario NFA map.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use vigil_backbones::{Backbone, BackboneKind, MsCait};
use vigil_core::{
    ChannelMode, Detector, FitContext, Image, ImageSource, Map, Mask, Result, ScoreOutput, TensorBag,
    ThresholdKind, VigilError,
};
pub use vigil_flow::TrainingFeatures;
use vigil_flow::{extract_training_features, kept_positions, FlowFit, TrainableFlow};
use vigil_nfa::maxtree::{tree_log10_nfa, Chi2Map};
use vigil_nn::default_device;

use crate::block_nfa::{BlockNfa, Latent};
use crate::feature_norm::UflowModel;

/// How the NFA map is computed from the latents.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Segmentation {
    /// Max-tree of upper level sets with the χ² Chernoff PFA (the paper's method).
    Tree,
    /// Binomial window test (window at the finest scale, probability q of a normal z²).
    Block { window: usize, probability: f64 },
}

/// How backbone features are normalised before the flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureNorm {
    /// As the official code: a trainable per-image `LayerNorm([C, H, W])` per scale, trained with
    /// the flow, for CNN backbones; nothing beyond the transformers' own final LayerNorm for MS-CaiT.
    #[default]
    Official,
    /// Fixed per-channel standardisation with the mean and standard deviation of the training
    /// features (vigil's earlier preprocessing; not in the paper).
    Standardize,
}

/// The training loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Loss {
    /// The official code's: the batch mean of Σ_l ½‖z_l‖² − log|det J| per image.
    #[default]
    Official,
    /// anomalib 2.7's `UFlowLoss`, which also sums ½‖z‖² over the batch: B times the official
    /// z term, i.e. the likelihood under N(0, I/B) while the map and the NFA assume N(0, I).
    Anomalib,
}

/// Everything needed to rebuild a U-Flow model. The default is the CPU preset: the paper's two
/// scales (one octave apart) from MobileNetV2 at strides 8 and 16 of the image at its native
/// 128 pixels, 4 steps per stage; it fits a 32-image PIPED class in seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UflowSettings {
    pub backbone: BackboneKind,
    /// Backbone weights; `None` looks for the shipped ones (`vigil_backbones::default_weights_path`).
    pub weights: Option<PathBuf>,
    /// Backbone layers, finest first; each must have twice the stride of the previous one.
    pub layers: Vec<String>,
    /// Square side images are resized to before the backbone.
    pub input_size: usize,
    pub flow_steps: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// The learning rate decays linearly from 1 to this factor over the whole fit.
    pub lr_end_factor: f64,
    /// Write a resumable checkpoint every this many steps (when a checkpoint folder is given).
    pub checkpoint_every: usize,
    pub segmentation: Segmentation,
    pub feature_norm: FeatureNorm,
    pub loss: Loss,
    /// The paper's MS-CaiT extractor; when set it replaces `backbone`, `weights`, `layers` and
    /// `input_size` (the transformers fix their own input sizes, 448 and 224).
    pub ms_cait: Option<MsCaitWeights>,
}

/// timm-named safetensors of the two MS-CaiT transformers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsCaitWeights {
    /// `cait_m48_448` (blocks beyond 40 are ignored).
    pub m48: PathBuf,
    /// `cait_s24_224` (blocks beyond 20 are ignored).
    pub s24: PathBuf,
}

impl Default for UflowSettings {
    fn default() -> Self {
        UflowSettings {
            backbone: BackboneKind::MobileNetV2,
            weights: None,
            layers: vec!["features.6".into(), "features.13".into()],
            input_size: 128,
            flow_steps: 4,
            epochs: 60,
            batch_size: 8,
            learning_rate: 1e-3,
            weight_decay: 1e-5,
            lr_end_factor: 0.4,
            checkpoint_every: 50,
            segmentation: Segmentation::Tree,
            feature_norm: FeatureNorm::Official,
            loss: Loss::Official,
            ms_cait: None,
        }
    }
}

impl UflowSettings {
    /// The same preset on EfficientNet-Lite0 taps at strides 8 and 16.
    pub fn efficientnet_lite0() -> Self {
        UflowSettings {
            backbone: BackboneKind::EfficientNetLite0,
            layers: vec!["_blocks.4".into(), "_blocks.10".into()],
            ..UflowSettings::default()
        }
    }

    /// Whether the flow is fitted behind trainable per-scale LayerNorms.
    fn layer_norm(&self) -> bool {
        self.feature_norm == FeatureNorm::Official && self.ms_cait.is_none()
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(VigilError::Config(format!("uflow: {m}")));
        if self.layers.is_empty() {
            return bad("at least one backbone layer is needed".into());
        }
        if self.input_size == 0
            || self.flow_steps == 0
            || self.epochs == 0
            || self.batch_size == 0
            || self.checkpoint_every == 0
        {
            return bad(
                "input_size, flow_steps, epochs, batch_size and checkpoint_every must be positive".into()
            );
        }
        // Written so that NaN fails too.
        let rates_valid = self.learning_rate > 0.0 && self.lr_end_factor > 0.0 && self.weight_decay >= 0.0;
        if !rates_valid {
            return bad("learning_rate and lr_end_factor must be > 0, weight_decay >= 0".into());
        }
        Ok(())
    }
}

/// Per-channel mean and standard deviation of the training features of one scale.
#[derive(Clone, Debug)]
struct Standardizer {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

enum Extractor {
    Cnn { backbone: Box<Backbone>, layers: Vec<String>, input_size: usize },
    MsCait(Box<MsCait>),
}

/// The frozen feature side of the model.
struct Features {
    extractor: Extractor,
    /// (channels, side) per scale, finest first.
    shapes: Vec<(usize, usize)>,
}

impl Features {
    fn new(settings: &UflowSettings) -> Result<Self> {
        if let Some(weights) = &settings.ms_cait {
            let extractor = MsCait::load(&weights.m48, &weights.s24)?;
            return Ok(Features {
                shapes: extractor.scales(),
                extractor: Extractor::MsCait(Box::new(extractor)),
            });
        }
        let backbone = Backbone::open(settings.backbone, settings.weights.as_deref(), None)?;
        let mut shapes = Vec::new();
        let mut previous_stride = None;
        for layer in &settings.layers {
            let (channels, stride) = backbone.layer_info(layer)?;
            if previous_stride.is_some_and(|p| stride != 2 * p) {
                return Err(VigilError::Config(format!(
                    "uflow: layer {layer} has stride {stride}; each layer needs twice the previous stride"
                )));
            }
            if !settings.input_size.is_multiple_of(stride) {
                return Err(VigilError::Config(format!(
                    "uflow: input size {} is not a multiple of layer {layer}'s stride {stride}",
                    settings.input_size
                )));
            }
            previous_stride = Some(stride);
            shapes.push((channels, settings.input_size / stride));
        }
        let extractor = Extractor::Cnn {
            backbone: Box::new(backbone),
            layers: settings.layers.clone(),
            input_size: settings.input_size,
        };
        Ok(Features { extractor, shapes })
    }

    /// Raw features per image and scale, each channel-major.
    fn extract(&self, images: &[Image]) -> Result<Vec<Vec<Vec<f32>>>> {
        let maps = match &self.extractor {
            Extractor::Cnn { backbone, layers, input_size } => {
                backbone.extract(images, layers, (*input_size, *input_size))?
            }
            Extractor::MsCait(extractor) => extractor.extract(images)?,
        };
        Ok(maps.into_iter().map(|per_scale| per_scale.into_iter().map(|m| m.data).collect()).collect())
    }
}

/// Standardises one scale in place.
fn standardize(data: &mut [f32], s: &Standardizer) {
    let plane = data.len() / s.mean.len();
    for (c, values) in data.chunks_exact_mut(plane).enumerate() {
        for v in values {
            *v = (*v - s.mean[c]) * s.inv_std[c];
        }
    }
}

/// Per-channel statistics of one scale over the positions whose weight is 1 (all without weights).
fn fit_standardizer(
    images: &[Vec<Vec<f32>>],
    weights: Option<&[Vec<Vec<f32>>]>,
    scale: usize,
    channels: usize,
) -> Standardizer {
    let mut sum = vec![0f64; channels];
    let mut sum_sq = vec![0f64; channels];
    let mut count = 0usize;
    for (i, image) in images.iter().enumerate() {
        let data = &image[scale];
        let plane = data.len() / channels;
        let kept = |p: usize| weights.is_none_or(|w| w[i][scale][p] > 0.0);
        count += (0..plane).filter(|&p| kept(p)).count();
        for (c, values) in data.chunks_exact(plane).enumerate() {
            for (p, &v) in values.iter().enumerate() {
                if kept(p) {
                    sum[c] += v as f64;
                    sum_sq[c] += (v as f64) * (v as f64);
                }
            }
        }
    }
    let count = count.max(1);
    let mean: Vec<f64> = sum.iter().map(|s| s / count as f64).collect();
    // Dead channels (ReLU6 zeros) have no variance; a floor keeps them finite and near zero.
    let inv_std = sum_sq
        .iter()
        .zip(&mean)
        .map(|(sq, m)| (1.0 / (sq / count as f64 - m * m).max(1e-6).sqrt()) as f32)
        .collect();
    Standardizer { mean: mean.iter().map(|&m| m as f32).collect(), inv_std }
}

/// Wall time of the last [`UflowDetector::score_timed`] call, split by phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScoreTiming {
    /// Backbone, flow and anomaly map.
    pub flow: Duration,
    /// The NFA segmentation alone.
    pub nfa: Duration,
}

/// U-Flow: [`Detector`] with method name "uflow".
pub struct UflowDetector {
    settings: UflowSettings,
    features: Option<Features>,
    /// Empty unless the settings ask for [`FeatureNorm::Standardize`].
    standardizers: Vec<Standardizer>,
    model: Option<UflowModel>,
    /// Mean loss per latent dimension of each epoch of the last fit.
    pub loss_history: Vec<f32>,
}

fn tensor_values(t: Tensor<4>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 tensor")
}

impl UflowDetector {
    pub fn new(settings: UflowSettings) -> Self {
        UflowDetector {
            settings,
            features: None,
            standardizers: Vec::new(),
            model: None,
            loss_history: Vec::new(),
        }
    }

    /// Rebuilds a fitted model from [`Detector::settings`] and [`Detector::state`].
    pub fn load(settings: &serde_json::Value, state: &TensorBag) -> Result<Self> {
        let settings: UflowSettings = serde_json::from_value(settings.clone())
            .map_err(|e| VigilError::Model(format!("uflow settings: {e}")))?;
        settings.validate()?;
        let features = Features::new(&settings)?;
        let mut standardizers = Vec::new();
        if settings.feature_norm == FeatureNorm::Standardize {
            for (l, &(channels, _)) in features.shapes.iter().enumerate() {
                standardizers.push(Standardizer {
                    mean: state.f32(&format!("features.scale{l}.mean"), Some(&[channels]))?,
                    inv_std: state.f32(&format!("features.scale{l}.inv_std"), Some(&[channels]))?,
                });
            }
        }
        let model = UflowModel::load(
            &features.shapes,
            settings.layer_norm(),
            settings.flow_steps,
            state,
            &default_device(),
        )?;
        Ok(UflowDetector {
            settings,
            features: Some(features),
            standardizers,
            model: Some(model),
            loss_history: Vec::new(),
        })
    }

    pub fn settings_struct(&self) -> &UflowSettings {
        &self.settings
    }

    fn fitted(&self) -> Result<(&Features, &UflowModel)> {
        match (&self.features, &self.model) {
            (Some(f), Some(model)) => Ok((f, model)),
            _ => Err(VigilError::Model("uflow: score called before fit or load".into())),
        }
    }

    /// Latents (finest first) of one image, each as (data channel-major, channels, side).
    fn latents(&self, image: &Image) -> Result<Vec<(Vec<f32>, usize, usize)>> {
        let (features, model) = self.fitted()?;
        let mut raw = features.extract(std::slice::from_ref(image))?.remove(0);
        let device = default_device();
        let inputs = raw
            .iter_mut()
            .enumerate()
            .map(|(l, data)| {
                if let Some(standardizer) = self.standardizers.get(l) {
                    standardize(data, standardizer);
                }
                let (c, side) = features.shapes[l];
                Tensor::from_data(TensorData::new(data.clone(), [1, c, side, side]), &device)
            })
            .collect();
        let (latents, _) = model.forward(inputs, None);
        Ok(latents
            .into_iter()
            .map(|z| {
                let [_, c, side, _] = z.dims();
                (tensor_values(z), c, side)
            })
            .collect())
    }

    /// [`Detector::score`] with the time spent in the flow and in the NFA.
    pub fn score_timed(&self, image: &Image, ignore: Option<&Mask>) -> Result<(ScoreOutput, ScoreTiming)> {
        if let Some(mask) = ignore {
            mask.check_fits(image, "uflow")?;
        }
        let start = Instant::now();
        let mut latents = self.latents(image)?;
        let (w, h) = (image.width, image.height);
        // AS = 1 − mean_l up(exp(−½ mean_c z²)).
        let mut likelihood = Map::filled(w, h, 0.0);
        let mut chi2 = Vec::with_capacity(latents.len());
        for (data, c, side) in &latents {
            let mut u = vec![0f32; side * side];
            for plane in data.chunks_exact(side * side) {
                for (acc, z) in u.iter_mut().zip(plane) {
                    *acc += z * z;
                }
            }
            let p: Vec<f32> = u.iter().map(|s| (-0.5 * s / *c as f32).exp()).collect();
            let up = Map { width: *side, height: *side, data: p }.resize_bilinear(w, h);
            for (acc, v) in likelihood.data.iter_mut().zip(&up.data) {
                *acc += v / latents.len() as f32;
            }
            chi2.push(Chi2Map { u: Map { width: *side, height: *side, data: u }, dof: *c });
        }
        let map = Map { width: w, height: h, data: likelihood.data.iter().map(|p| 1.0 - p).collect() };
        map.check_finite("uflow")?;
        // Ignored positions take the most normal value, z = 0, so they can neither start nor join a
        // detected region; they still count among the tests.
        if let Some(mask) = ignore {
            for ((data, _, side), chi2) in latents.iter_mut().zip(chi2.iter_mut()) {
                let kept = kept_positions(mask, *side);
                for (u, &k) in chi2.u.data.iter_mut().zip(&kept) {
                    *u *= k;
                }
                for plane in data.chunks_exact_mut(*side * *side) {
                    for (z, &k) in plane.iter_mut().zip(&kept) {
                        *z *= k;
                    }
                }
            }
        }
        let flow_time = start.elapsed();

        let start = Instant::now();
        let log10_nfa = match self.settings.segmentation {
            Segmentation::Tree => tree_log10_nfa(&chi2, w, h)?,
            Segmentation::Block { window, probability } => {
                let views: Vec<Latent> = latents
                    .iter()
                    .map(|(data, c, side)| Latent { data, channels: *c, width: *side, height: *side })
                    .collect();
                BlockNfa { window, probability }.log10_nfa(&views, w, h)?
            }
        };
        let nfa_time = start.elapsed();
        let image_score = match ignore {
            None => map.max(),
            // The most anomalous kept pixel; 0 (no anomaly) when every pixel is ignored.
            Some(mask) => map
                .data
                .iter()
                .zip(&mask.data)
                .filter(|(_, &ignored)| !ignored)
                .map(|(&v, _)| v)
                .fold(0.0, f32::max),
        };
        Ok((
            ScoreOutput { map, image_score: Some(image_score), log10_nfa: Some(log10_nfa) },
            ScoreTiming { flow: flow_time, nfa: nfa_time },
        ))
    }
}

/// Trains a U-Flow (and, if the settings ask for it, its per-scale LayerNorms) on features already
/// standardised or raw. Returns the inference-side model and the mean loss per latent
/// dimension of each epoch. With a checkpoint folder in `ctx`, the state is written every
/// `checkpoint_every` steps and a later call with the same folder resumes from it exactly.
pub fn train_flow(
    settings: &UflowSettings,
    data: &TrainingFeatures,
    ctx: &FitContext,
) -> Result<(UflowModel, Vec<f32>)> {
    train_flow_session(settings, data, ctx, None)
}

/// [`train_flow`] that stops this session (after writing a checkpoint) once `session_limit`
/// steps are done in total, returning [`VigilError::Interrupted`]; a later call finishes the run.
pub fn train_flow_session(
    settings: &UflowSettings,
    data: &TrainingFeatures,
    ctx: &FitContext,
    session_limit: Option<usize>,
) -> Result<(UflowModel, Vec<f32>)> {
    train_flow_on(settings, data, ctx, session_limit, None)
}

/// [`train_flow_session`] whose checkpoints record the images the features come from
/// (`training_set`), so that a resume on other images is refused.
fn train_flow_on(
    settings: &UflowSettings,
    data: &TrainingFeatures,
    ctx: &FitContext,
    session_limit: Option<usize>,
    training_set: Option<vigil_core::DataFingerprint>,
) -> Result<(UflowModel, Vec<f32>)> {
    settings.validate()?;
    let shapes = data.shapes;
    let fit = FlowFit {
        method: "uflow",
        settings: serde_json::to_value(settings)
            .map_err(|e| VigilError::Model(format!("uflow settings: {e}")))?,
        epochs: settings.epochs,
        batch_size: settings.batch_size,
        checkpoint_every: settings.checkpoint_every,
        weight_decay: settings.weight_decay as f32,
        // PyTorch LinearLR: factor 1 → lr_end_factor over all steps.
        learning_rate: &|step, total| {
            settings.learning_rate * (1.0 + (settings.lr_end_factor - 1.0) * step as f64 / total as f64)
        },
        z_weight: &|batch| match settings.loss {
            Loss::Official => 1.0,
            Loss::Anomalib => batch as f32,
        },
    };
    let (layer_norm, steps) = (settings.layer_norm(), settings.flow_steps);
    let trained = vigil_flow::train_flow(
        &fit,
        data,
        ctx,
        session_limit,
        training_set,
        |device| UflowModel::new(shapes, layer_norm, steps, ctx.seed, device),
        |bag, device| UflowModel::load(shapes, layer_norm, steps, bag, device),
    )?;
    let dims_per_image: usize = shapes.iter().map(|(c, s)| c * s * s).sum();
    let losses = trained.epoch_losses(settings.batch_size, data.values.len(), dims_per_image);
    // Inference runs without the autodiff graph: rebuild the flow from its learned state.
    Ok((UflowModel::load(shapes, layer_norm, steps, &trained.state, &default_device())?, losses))
}

impl Detector for UflowDetector {
    fn method(&self) -> &'static str {
        "uflow"
    }

    fn weights_files(&self) -> Vec<vigil_core::WeightsFile> {
        match self.features.as_ref().map(|f| &f.extractor) {
            Some(Extractor::Cnn { backbone, .. }) => backbone.weights_file().cloned().into_iter().collect(),
            Some(Extractor::MsCait(extractor)) => extractor.weights_files(),
            None => Vec::new(),
        }
    }

    fn channel_mode(&self) -> ChannelMode {
        ChannelMode::Rgb
    }

    fn fit(&mut self, train: &dyn ImageSource, ctx: &FitContext) -> Result<()> {
        self.settings.validate()?;
        if train.is_empty() {
            return Err(VigilError::invalid("uflow: no training images"));
        }
        let features = Features::new(&self.settings)?;
        // Ignored regions are left out of the loss (and of the standardisation statistics).
        let (mut extracted, position_weights) =
            extract_training_features("uflow", train, 8, &features.shapes, |images| {
                features.extract(images)
            })?;
        let standardizers: Vec<Standardizer> = match self.settings.feature_norm {
            FeatureNorm::Official => Vec::new(),
            FeatureNorm::Standardize => features
                .shapes
                .iter()
                .enumerate()
                .map(|(l, &(c, _))| fit_standardizer(&extracted, position_weights.as_deref(), l, c))
                .collect(),
        };
        if !standardizers.is_empty() {
            for image in extracted.iter_mut() {
                for (l, data) in image.iter_mut().enumerate() {
                    standardize(data, &standardizers[l]);
                }
            }
        }

        let data = TrainingFeatures {
            values: &extracted,
            shapes: &features.shapes,
            position_weights: position_weights.as_deref(),
        };
        let training_set = ctx.checkpoint_dir.as_ref().map(|_| train.fingerprint()).transpose()?;
        let (model, losses) = train_flow_on(&self.settings, &data, ctx, None, training_set)?;
        self.loss_history = losses;
        self.model = Some(model);
        self.standardizers = standardizers;
        self.features = Some(features);
        Ok(())
    }

    fn score(&self, image: &Image, ignore: Option<&Mask>) -> Result<ScoreOutput> {
        Ok(self.score_timed(image, ignore)?.0)
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).expect("settings serialise")
    }

    fn state(&self) -> Result<TensorBag> {
        let (_, model) = self.fitted()?;
        let mut bag = TensorBag::new();
        model.save(&mut bag);
        for (l, s) in self.standardizers.iter().enumerate() {
            bag.put_f32(&format!("features.scale{l}.mean"), &[s.mean.len()], s.mean.clone());
            bag.put_f32(&format!("features.scale{l}.inv_std"), &[s.inv_std.len()], s.inv_std.clone());
        }
        Ok(bag)
    }

    fn default_threshold(&self) -> Option<ThresholdKind> {
        Some(ThresholdKind::Nfa { k: 0.0 })
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Features with structure a flow can learn: a per-image latent factor shared by all
    /// channels plus small noise, far from the standard normal the flow starts at.
    fn synthetic_features(n: usize, shapes: &[(usize, usize)], seed: u64) -> Vec<Vec<Vec<f32>>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let factor: f32 = rng.gen_range(-3.0..3.0);
                shapes
                    .iter()
                    .map(|&(c, s)| {
                        (0..c * s * s)
                            .map(|i| factor * (1.0 + (i % c) as f32) + rng.gen_range(-0.1..0.1))
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    fn features<'a>(images: &'a [Vec<Vec<f32>>], shapes: &'a [(usize, usize)]) -> TrainingFeatures<'a> {
        TrainingFeatures { values: images, shapes, position_weights: None }
    }

    #[test]
    fn tiny_u_flow_training_lowers_the_loss() {
        let shapes = [(4, 4), (8, 2)];
        let images = synthetic_features(8, &shapes, 1);
        for feature_norm in [FeatureNorm::Official, FeatureNorm::Standardize] {
            let settings = UflowSettings {
                epochs: 6,
                batch_size: 4,
                learning_rate: 1e-2,
                flow_steps: 2,
                feature_norm,
                ..UflowSettings::default()
            };
            let (model, losses) =
                train_flow(&settings, &features(&images, &shapes), &FitContext::default()).unwrap();
            assert_eq!(losses.len(), 6);
            assert!(losses.iter().all(|l| l.is_finite()));
            assert!(losses[5] < 0.8 * losses[0], "{feature_norm:?}: loss did not fall: {losses:?}");
            assert_eq!(model.flow().shape().feature_channels, vec![4, 8]);
            assert_eq!(model.has_layer_norm(), feature_norm == FeatureNorm::Official);
            // Same seed, same training.
            let (_, again) =
                train_flow(&settings, &features(&images, &shapes), &FitContext::default()).unwrap();
            assert_eq!(losses, again);
        }
    }

    #[test]
    fn ignored_positions_leave_the_loss() {
        let shapes = [(4, 4), (8, 2)];
        let images = synthetic_features(8, &shapes, 4);
        let settings = UflowSettings {
            epochs: 3,
            batch_size: 4,
            learning_rate: 1e-2,
            flow_steps: 2,
            ..UflowSettings::default()
        };
        let ones: Vec<Vec<Vec<f32>>> =
            images.iter().map(|_| shapes.iter().map(|&(_, s)| vec![1.0; s * s]).collect()).collect();
        let all_kept = TrainingFeatures { position_weights: Some(&ones), ..features(&images, &shapes) };
        let (_, plain) = train_flow(&settings, &features(&images, &shapes), &FitContext::default()).unwrap();
        let (_, weighted) = train_flow(&settings, &all_kept, &FitContext::default()).unwrap();
        for (a, b) in plain.iter().zip(&weighted) {
            assert!(
                (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                "all-ones weights changed the loss: {plain:?} {weighted:?}"
            );
        }
    }

    #[test]
    fn interrupted_training_resumes_to_the_same_flow() {
        let shapes = [(4, 4), (8, 2)];
        // 10 images in batches of 4: three steps per epoch, the last one short.
        let images = synthetic_features(10, &shapes, 2);
        let settings = UflowSettings {
            epochs: 4,
            batch_size: 4,
            flow_steps: 2,
            checkpoint_every: 5,
            ..UflowSettings::default()
        };
        let (straight, straight_losses) =
            train_flow(&settings, &features(&images, &shapes), &FitContext::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ctx = FitContext { checkpoint_dir: Some(dir.path().to_path_buf()), ..FitContext::default() };
        // Stop mid-epoch, after step 7 of 12, then finish with a fresh call.
        let stopped = train_flow_session(&settings, &features(&images, &shapes), &ctx, Some(7)).unwrap_err();
        assert!(matches!(stopped, VigilError::Interrupted(_)), "{stopped}");
        let (resumed, resumed_losses) = train_flow(&settings, &features(&images, &shapes), &ctx).unwrap();
        let bag = |model: &UflowModel| {
            let mut bag = TensorBag::new();
            model.save(&mut bag);
            bag
        };
        assert_eq!(bag(&resumed), bag(&straight));
        assert_eq!(resumed_losses, straight_losses);
        // A checkpoint from other settings is refused, naming the file.
        let other = UflowSettings { epochs: 5, ..settings.clone() };
        let error = train_flow(&other, &features(&images, &shapes), &ctx).unwrap_err().to_string();
        assert!(error.contains("uflow-train.ckpt") && error.contains("delete it"), "{error}");
    }

    #[test]
    fn training_rejects_mismatched_features() {
        let shapes = [(4, 4), (8, 2)];
        let mut images = synthetic_features(2, &shapes, 1);
        images[1][0].pop();
        let ctx = FitContext::default();
        assert!(train_flow(&UflowSettings::default(), &features(&images, &shapes), &ctx).is_err());
        assert!(train_flow(&UflowSettings::default(), &features(&[], &shapes), &ctx).is_err());
    }

    #[test]
    fn settings_round_trip_and_reject_unknown_fields() {
        let settings = UflowSettings {
            segmentation: Segmentation::Block { window: 7, probability: 0.5 },
            ..UflowSettings::efficientnet_lite0()
        };
        let json = serde_json::to_value(&settings).unwrap();
        assert_eq!(serde_json::from_value::<UflowSettings>(json).unwrap(), settings);
        let bad = serde_json::json!({ "epochs": 3, "epoch": 4 });
        assert!(UflowDetector::load(&bad, &TensorBag::new()).is_err());
        let zero = serde_json::json!({ "batch_size": 0 });
        assert!(UflowDetector::load(&zero, &TensorBag::new()).is_err());
        let missing = serde_json::json!({ "ms_cait": { "m48": "/nonexistent/m48.safetensors", "s24": "/nonexistent/s24.safetensors" } });
        let err = UflowDetector::load(&missing, &TensorBag::new()).err().unwrap();
        assert!(err.to_string().contains("m48.safetensors"), "{err}");
    }

    #[test]
    fn unfitted_detector_refuses_to_score() {
        let detector = UflowDetector::new(UflowSettings::default());
        assert!(detector.score(&Image::zeros(8, 8, 3), None).is_err());
        assert!(detector.state().is_err());
        assert_eq!(detector.default_threshold(), Some(ThresholdKind::Nfa { k: 0.0 }));
    }

    #[test]
    fn fits_a_piped_class_scores_and_reloads() {
        let Some(class) = vigil_core::shared_data::shared_path("data/piped/PA_BDP01_TL") else { return };
        let load = |dir: &str, count: usize| -> Vec<Image> {
            let mut paths: Vec<PathBuf> =
                std::fs::read_dir(class.join(dir)).unwrap().map(|e| e.unwrap().path()).collect();
            paths.sort();
            paths.iter().take(count).map(|p| vigil_data::io::load_image(p).unwrap().to_rgb()).collect()
        };
        let train = vigil_core::InMemorySource::new(load("train/good", 8));
        let settings = UflowSettings { epochs: 2, ..UflowSettings::default() };
        let mut detector = UflowDetector::new(settings);
        detector.fit(&train, &FitContext::default()).unwrap();
        assert_eq!(detector.loss_history.len(), 2);

        let image = load("test/impurity", 1).remove(0);
        let out = detector.score(&image, None).unwrap();
        assert_eq!((out.map.width, out.map.height), (image.width, image.height));
        let nfa = out.log10_nfa.as_ref().unwrap();
        assert_eq!((nfa.width, nfa.height), (image.width, image.height));
        nfa.check_finite("nfa").unwrap();
        assert!(out.map.data.iter().all(|&v| (0.0..=1.0).contains(&v)));
        assert_eq!(out.image_score, Some(out.map.max()));

        let reloaded = UflowDetector::load(&detector.settings(), &detector.state().unwrap()).unwrap();
        let again = reloaded.score(&image, None).unwrap();
        assert_eq!(again.map, out.map);
        assert_eq!(again.log10_nfa, out.log10_nfa);
    }
}
