//! FastFlow as a vigil [`Detector`]: frozen backbone features at several strides, a trainable
//! LayerNorm and an independent 2D flow per scale trained by maximum likelihood on normal
//! images, and the likelihood anomaly map.

use burn::tensor::{Tensor, TensorData};
use vigil_backbones::Backbone;
use vigil_core::{
    ChannelMode, DataFingerprint, Detector, FitContext, Image, ImageSource, Map, Mask, Result, ScoreOutput,
    TensorBag, VigilError,
};
pub use vigil_flow::TrainingFeatures;
use vigil_flow::{extract_training_features, train_flow, FlowFit, TrainableFlow};
use vigil_nn::default_device;

use crate::model::FastflowModel;
use crate::settings::{FastflowSettings, FastflowSpec};

/// Images per backbone call while extracting the training features.
const EXTRACT_CHUNK: usize = 8;

/// The frozen feature side of the model.
struct Features {
    backbone: Backbone,
    /// (channels, side) per scale, in the order of `settings.layers`.
    shapes: Vec<(usize, usize)>,
}

impl Features {
    fn new(settings: &FastflowSettings) -> Result<Self> {
        let backbone =
            Backbone::open(settings.backbone, settings.weights.as_deref(), settings.random_weights_seed)?;
        let mut shapes = Vec::with_capacity(settings.layers.len());
        for layer in &settings.layers {
            let (channels, stride) = backbone.layer_info(layer)?;
            if !settings.input_size.is_multiple_of(stride) {
                return Err(VigilError::Config(format!(
                    "fastflow: input size {} is not a multiple of layer {layer}'s stride {stride}",
                    settings.input_size
                )));
            }
            if channels < 2 {
                return Err(VigilError::Config(format!("fastflow: layer {layer} has fewer than 2 channels")));
            }
            shapes.push((channels, settings.input_size / stride));
        }
        Ok(Features { backbone, shapes })
    }

    /// Raw features per image and scale, each channel-major.
    fn extract(&self, images: &[Image], settings: &FastflowSettings) -> Result<Vec<Vec<Vec<f32>>>> {
        let size = (settings.input_size, settings.input_size);
        let maps = self.backbone.extract(images, &settings.layers, size)?;
        Ok(maps.into_iter().map(|per_scale| per_scale.into_iter().map(|m| m.data).collect()).collect())
    }
}

fn tensor_values(t: Tensor<4>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 tensor")
}

/// FastFlow: [`Detector`] with method name "fastflow".
pub struct FastflowDetector {
    settings: FastflowSettings,
    features: Option<Features>,
    model: Option<FastflowModel>,
    /// Mean training loss (anomalib's, per image) of each epoch of the last fit.
    pub loss_history: Vec<f32>,
}

impl FastflowDetector {
    pub fn new(settings: FastflowSettings) -> Result<Self> {
        settings.validate()?;
        Ok(FastflowDetector { settings, features: None, model: None, loss_history: Vec::new() })
    }

    /// Rebuilds a fitted model from [`Detector::settings`] and [`Detector::state`].
    pub fn load(settings: &serde_json::Value, state: &TensorBag) -> Result<Self> {
        let settings: FastflowSettings = serde_json::from_value(settings.clone())
            .map_err(|e| VigilError::Model(format!("fastflow settings: {e}")))?;
        settings.validate()?;
        let features = Features::new(&settings)?;
        let model = FastflowModel::load(
            &features.shapes,
            settings.flow_steps,
            settings.conv3x3_only,
            state,
            &default_device(),
        )?;
        Ok(FastflowDetector {
            settings,
            features: Some(features),
            model: Some(model),
            loss_history: Vec::new(),
        })
    }

    pub fn settings_struct(&self) -> &FastflowSettings {
        &self.settings
    }

    fn fitted(&self) -> Result<(&Features, &FastflowModel)> {
        match (&self.features, &self.model) {
            (Some(f), Some(model)) => Ok((f, model)),
            _ => Err(VigilError::Model("fastflow: score called before fit or load".into())),
        }
    }
}

/// Trains FastFlow's norms and flows on raw backbone features ([`train_flow`] with anomalib's
/// loss and a constant learning rate). Returns the inference-side model and the mean loss per
/// image of each epoch. `session_limit` and `training_set` as [`train_flow`].
pub fn train_fastflow(
    settings: &FastflowSettings,
    data: &TrainingFeatures,
    ctx: &FitContext,
    session_limit: Option<usize>,
    training_set: Option<DataFingerprint>,
) -> Result<(FastflowModel, Vec<f32>)> {
    settings.validate()?;
    let shapes = data.shapes;
    let fit = FlowFit {
        method: "fastflow",
        settings: serde_json::to_value(FastflowSpec::complete(settings))
            .map_err(|e| VigilError::Model(format!("fastflow settings: {e}")))?,
        epochs: settings.epochs,
        batch_size: settings.batch_size,
        checkpoint_every: settings.checkpoint_every,
        weight_decay: settings.weight_decay as f32,
        learning_rate: &|_, _| settings.learning_rate,
        // anomalib's FastflowLoss, Σ_l mean_b(½‖z_l‖² − log|det J_l|), equals the batch mean of
        // the per-sample sums since the mean is linear.
        z_weight: &|_| 1.0,
    };
    let (steps, conv3x3_only) = (settings.flow_steps, settings.conv3x3_only);
    let trained = train_flow(
        &fit,
        data,
        ctx,
        session_limit,
        training_set,
        |device| FastflowModel::new(shapes, steps, conv3x3_only, ctx.seed, device),
        |bag, device| FastflowModel::load(shapes, steps, conv3x3_only, bag, device),
    )?;
    let losses = trained.epoch_losses(settings.batch_size, data.values.len(), 1);
    // Inference runs without the autodiff graph: rebuild the model from its learned state.
    let model = FastflowModel::load(shapes, steps, conv3x3_only, &trained.state, &default_device())?;
    Ok((model, losses))
}

impl Detector for FastflowDetector {
    fn method(&self) -> &'static str {
        "fastflow"
    }

    fn weights_files(&self) -> Vec<vigil_core::WeightsFile> {
        self.features.as_ref().and_then(|f| f.backbone.weights_file().cloned()).into_iter().collect()
    }

    fn channel_mode(&self) -> ChannelMode {
        ChannelMode::Rgb
    }

    fn fit(&mut self, train: &dyn ImageSource, ctx: &FitContext) -> Result<()> {
        self.settings.validate()?;
        if train.is_empty() {
            return Err(VigilError::invalid("fastflow: no training images"));
        }
        let features = Features::new(&self.settings)?;
        // Ignored regions are left out of the loss: their positions' ½‖z‖² and log-det shares.
        let (extracted, position_weights) =
            extract_training_features("fastflow", train, EXTRACT_CHUNK, &features.shapes, |images| {
                features.extract(images, &self.settings)
            })?;
        let data = TrainingFeatures {
            values: &extracted,
            shapes: &features.shapes,
            position_weights: position_weights.as_deref(),
        };
        let training_set = ctx.checkpoint_dir.as_ref().map(|_| train.fingerprint()).transpose()?;
        let (model, losses) = train_fastflow(&self.settings, &data, ctx, None, training_set)?;
        self.loss_history = losses;
        self.model = Some(model);
        self.features = Some(features);
        Ok(())
    }

    fn score(&self, image: &Image, ignore: Option<&Mask>) -> Result<ScoreOutput> {
        if let Some(mask) = ignore {
            mask.check_fits(image, "fastflow")?;
        }
        let (features, model) = self.fitted()?;
        let raw = features.extract(std::slice::from_ref(image), &self.settings)?.remove(0);
        let device = default_device();
        let inputs = raw
            .into_iter()
            .zip(&features.shapes)
            .map(|(data, &(c, side))| Tensor::from_data(TensorData::new(data, [1, c, side, side]), &device))
            .collect();
        let (latents, _) = model.forward(inputs, None);
        // anomalib's AnomalyMapGenerator: mean over scales of up(−exp(−½ mean_c z²)), bilinear.
        let (w, h) = (image.width, image.height);
        let scales = latents.len() as f32;
        let mut map = Map::filled(w, h, 0.0);
        for z in latents {
            let [_, c, side, _] = z.dims();
            let values = tensor_values(z);
            let mut squares = vec![0f32; side * side];
            for plane in values.chunks_exact(side * side) {
                for (acc, v) in squares.iter_mut().zip(plane) {
                    *acc += v * v;
                }
            }
            let flow_map: Vec<f32> = squares.iter().map(|s| -(-0.5 * s / c as f32).exp()).collect();
            let up = Map { width: side, height: side, data: flow_map }.resize_bilinear(w, h);
            for (acc, v) in map.data.iter_mut().zip(&up.data) {
                *acc += v / scales;
            }
        }
        map.check_finite("fastflow")?;
        // anomalib's score: the map's maximum; with an ignore mask, over the kept pixels (the least
        // anomalous value, −1, when every pixel is ignored).
        let image_score = match ignore {
            None => map.max(),
            Some(mask) => map
                .data
                .iter()
                .zip(&mask.data)
                .filter(|(_, &ignored)| !ignored)
                .map(|(&v, _)| v)
                .fold(-1.0, f32::max),
        };
        Ok(ScoreOutput { map, image_score: Some(image_score), log10_nfa: None })
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(FastflowSpec::complete(&self.settings)).expect("settings serialise")
    }

    fn state(&self) -> Result<TensorBag> {
        let (_, model) = self.fitted()?;
        let mut bag = TensorBag::new();
        model.save(&mut bag);
        Ok(bag)
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use vigil_core::InMemorySource;

    use super::*;

    /// Features with structure a flow can learn: a per-image factor shared by all channels plus
    /// small noise, far from the standard normal the flow starts at.
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

    fn small_settings() -> FastflowSettings {
        FastflowSettings {
            epochs: 4,
            batch_size: 4,
            flow_steps: 2,
            checkpoint_every: 5,
            ..FastflowSettings::default()
        }
    }

    fn features<'a>(images: &'a [Vec<Vec<f32>>], shapes: &'a [(usize, usize)]) -> TrainingFeatures<'a> {
        TrainingFeatures { values: images, shapes, position_weights: None }
    }

    #[test]
    fn training_lowers_the_loss_and_is_deterministic() {
        let shapes = [(4, 4), (6, 2)];
        let images = synthetic_features(8, &shapes, 1);
        let settings = FastflowSettings { epochs: 6, learning_rate: 1e-2, ..small_settings() };
        let ctx = FitContext::default();
        let (_, losses) = train_fastflow(&settings, &features(&images, &shapes), &ctx, None, None).unwrap();
        assert_eq!(losses.len(), 6);
        assert!(losses[5] < losses[0] - 1.0, "loss did not fall: {losses:?}");
        let (_, again) = train_fastflow(&settings, &features(&images, &shapes), &ctx, None, None).unwrap();
        assert_eq!(losses, again);
        // All-ones position weights are the plain loss.
        let ones: Vec<Vec<Vec<f32>>> =
            images.iter().map(|_| shapes.iter().map(|&(_, s)| vec![1.0; s * s]).collect()).collect();
        let weighted = TrainingFeatures { position_weights: Some(&ones), ..features(&images, &shapes) };
        let (_, with_ones) = train_fastflow(&settings, &weighted, &ctx, None, None).unwrap();
        for (a, b) in losses.iter().zip(&with_ones) {
            assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{losses:?} vs {with_ones:?}");
        }
        // Weights that leave positions out lower the loss's z and log-det sums.
        let mut half = ones.clone();
        for image in &mut half {
            for scale in image.iter_mut() {
                let n = scale.len();
                scale[..n / 2].fill(0.0);
            }
        }
        let halved = TrainingFeatures { position_weights: Some(&half), ..features(&images, &shapes) };
        let (_, with_half) = train_fastflow(&settings, &halved, &ctx, None, None).unwrap();
        assert!((with_half[0] - losses[0]).abs() > 1.0, "{with_half:?} vs {losses:?}");
    }

    #[test]
    fn interrupted_training_resumes_to_the_same_model() {
        let shapes = [(4, 4), (6, 2)];
        // 10 images in batches of 4: three steps per epoch, the last one short.
        let images = synthetic_features(10, &shapes, 2);
        let settings = small_settings();
        let plain = FitContext::default();
        let (straight, straight_losses) =
            train_fastflow(&settings, &features(&images, &shapes), &plain, None, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ctx = FitContext { checkpoint_dir: Some(dir.path().to_path_buf()), ..FitContext::default() };
        let stopped =
            train_fastflow(&settings, &features(&images, &shapes), &ctx, Some(7), None).unwrap_err();
        assert!(matches!(stopped, VigilError::Interrupted(_)), "{stopped}");
        let (resumed, resumed_losses) =
            train_fastflow(&settings, &features(&images, &shapes), &ctx, None, None).unwrap();
        let bag = |model: &FastflowModel| {
            let mut bag = TensorBag::new();
            model.save(&mut bag);
            bag
        };
        assert_eq!(bag(&resumed), bag(&straight));
        assert_eq!(resumed_losses, straight_losses);
        let other = FastflowSettings { epochs: 5, ..settings };
        let error =
            train_fastflow(&other, &features(&images, &shapes), &ctx, None, None).unwrap_err().to_string();
        assert!(error.contains("fastflow-train.ckpt") && error.contains("delete it"), "{error}");
    }

    #[test]
    fn training_rejects_mismatched_features() {
        let shapes = [(4, 4), (6, 2)];
        let mut images = synthetic_features(2, &shapes, 1);
        images[1][0].pop();
        let ctx = FitContext::default();
        assert!(train_fastflow(&small_settings(), &features(&images, &shapes), &ctx, None, None).is_err());
        assert!(train_fastflow(&small_settings(), &features(&[], &shapes), &ctx, None, None).is_err());
    }

    /// A smooth striped texture with a random phase and a little noise; `defect` paints a bright
    /// square at (x, y) of side s.
    fn texture(seed: u64, defect: Option<(usize, usize, usize)>) -> Image {
        let (w, h) = (64, 64);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let phase: f32 = rng.gen_range(0.0..std::f32::consts::TAU);
        let mut image = Image::zeros(w, h, 3);
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let stripes = 0.5 + 0.2 * ((x as f32 * 0.5 + phase).sin() + c as f32 * 0.1);
                    let mut v = stripes + rng.gen_range(-0.02..0.02);
                    if let Some((dx, dy, s)) = defect {
                        if (dx..dx + s).contains(&x) && (dy..dy + s).contains(&y) {
                            v = if c == 0 { 1.0 } else { 0.0 };
                        }
                    }
                    image.data[(c * h + y) * w + x] = v;
                }
            }
        }
        image
    }

    #[test]
    fn fit_then_score_separates_a_defect_and_reloads_the_same() {
        let train = InMemorySource::new((0..12).map(|i| texture(i, None)).collect());
        let settings = FastflowSettings {
            random_weights_seed: Some(1),
            input_size: 64,
            epochs: 15,
            batch_size: 4,
            ..FastflowSettings::default()
        };
        let mut detector = FastflowDetector::new(settings).unwrap();
        assert!(detector.score(&texture(0, None), None).is_err(), "unfitted detectors refuse to score");
        detector.fit(&train, &FitContext::default()).unwrap();
        assert!(detector.loss_history[14] < detector.loss_history[0], "{:?}", detector.loss_history);
        let normal: Vec<f32> = (100..106)
            .map(|i| detector.score(&texture(i, None), None).unwrap().image_score.unwrap())
            .collect();
        let defect = (40, 12, 10);
        for i in 200..206 {
            let image = texture(i, Some(defect));
            let out = detector.score(&image, None).unwrap();
            let score = out.image_score.unwrap();
            assert_eq!(score, out.map.max());
            assert!(out.map.data.iter().all(|v| (-1.0..=0.0).contains(v)));
            assert!(normal.iter().all(|&n| score > n), "defect {score} vs normals {normal:?}");
            // The map's peak lies on the defect (within the coarsest scale's cell).
            let peak = out.map.data.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            let (px, py) = (peak % 64, peak / 64);
            assert!((24..66).contains(&px) && py < 38, "peak at ({px}, {py})");
            // Ignoring the defect's region takes it out of the image score.
            let mut mask = Mask::empty(64, 64);
            for y in 0..40 {
                for x in 24..64 {
                    mask.data[y * 64 + x] = true;
                }
            }
            let ignored = detector.score(&image, Some(&mask)).unwrap().image_score.unwrap();
            assert!(ignored < score && ignored <= normal.iter().cloned().fold(f32::MIN, f32::max) + 0.05);
        }
        let reloaded = FastflowDetector::load(&detector.settings(), &detector.state().unwrap()).unwrap();
        let image = texture(300, Some(defect));
        assert_eq!(reloaded.score(&image, None).unwrap().map, detector.score(&image, None).unwrap().map);
    }

    #[test]
    fn bad_settings_and_mismatched_masks_are_refused() {
        let zero = serde_json::json!({ "batch_size": 0 });
        assert!(FastflowDetector::load(&zero, &TensorBag::new()).is_err());
        let odd =
            FastflowSettings { input_size: 66, random_weights_seed: Some(1), ..FastflowSettings::default() };
        let error = Features::new(&odd).err().unwrap().to_string();
        assert!(error.contains("stride"), "{error}");
        let mut detector = FastflowDetector::new(FastflowSettings {
            random_weights_seed: Some(1),
            input_size: 32,
            epochs: 1,
            flow_steps: 1,
            ..FastflowSettings::default()
        })
        .unwrap();
        detector.fit(&InMemorySource::new(vec![texture(0, None); 2]), &FitContext::default()).unwrap();
        let error = detector.score(&texture(1, None), Some(&Mask::empty(8, 8))).unwrap_err().to_string();
        assert!(error.contains("ignore mask"), "{error}");
    }
}
