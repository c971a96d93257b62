//! CS-Flow as a vigil [`Detector`]: one frozen backbone layer on the image at several scales, a
//! cross-scale normalizing flow trained by maximum likelihood on normal images, the product of the
//! scales' mean squared latents as the map and the mean of z²/2 as the image score.

use burn::tensor::{Tensor, TensorData};
use vigil_backbones::Backbone;
use vigil_core::{
    ChannelMode, DataFingerprint, Detector, FitContext, Image, ImageSource, Map, Mask, Result, ScoreOutput,
    TensorBag, VigilError,
};
pub use vigil_flow::TrainingFeatures;
use vigil_flow::{extract_training_features, kept_positions, train_flow_with, FlowFit, FlowOptions};
use vigil_nn::{default_device, tensor_to_vec};

use crate::model::{CsflowModel, CsflowShape};
use crate::settings::{CsflowSettings, CsflowSpec};

/// Images per backbone call while extracting the training features.
const EXTRACT_CHUNK: usize = 8;

/// The frozen feature side of the model.
struct Features {
    backbone: Backbone,
    /// (channels, side) per scale, finest first.
    shapes: Vec<(usize, usize)>,
}

impl Features {
    fn new(settings: &CsflowSettings) -> Result<Self> {
        let backbone =
            Backbone::open(settings.backbone, settings.weights.as_deref(), settings.random_weights_seed)?;
        let (channels, stride) = backbone.layer_info(&settings.layer)?;
        let step = stride << (settings.scales - 1);
        if !settings.input_size.is_multiple_of(step) {
            return Err(VigilError::Config(format!(
                "csflow: input size {} is not a multiple of {step} (layer {}'s stride {stride} times 2^(scales-1) \
                 for {} scales)",
                settings.input_size, settings.layer, settings.scales
            )));
        }
        let shapes = (0..settings.scales).map(|s| (channels, (settings.input_size / stride) >> s)).collect();
        Ok(Features { backbone, shapes })
    }

    /// Features per image and scale, each channel-major: the backbone layer on the normalised
    /// image resized to `input_size`, and on that every 2^s-th pixel for scale s (PyTorch's
    /// default nearest `F.interpolate` to input_size / 2^s).
    fn extract(&self, images: &[Image], settings: &CsflowSettings) -> Result<Vec<Vec<Vec<f32>>>> {
        let size = settings.input_size;
        let batch = self.backbone.preprocess(images, (size, size))?;
        let full = tensor_to_vec(batch.clone());
        let device = batch.device();
        let n = images.len();
        let mut result: Vec<Vec<Vec<f32>>> = vec![Vec::with_capacity(self.shapes.len()); n];
        for (scale, &(channels, side)) in self.shapes.iter().enumerate() {
            let input = if scale == 0 {
                batch.clone()
            } else {
                let (factor, small) = (1 << scale, size >> scale);
                let mut data = Vec::with_capacity(n * 3 * small * small);
                for plane in full.chunks_exact(size * size) {
                    for y in 0..small {
                        let row = &plane[y * factor * size..];
                        data.extend((0..small).map(|x| row[x * factor]));
                    }
                }
                Tensor::from_data(TensorData::new(data, [n, 3, small, small]), &device)
            };
            let output =
                self.backbone.extract_tensor(input, std::slice::from_ref(&settings.layer))?.remove(0);
            let dims = output.dims();
            if dims[1..] != [channels, side, side] {
                return Err(VigilError::Model(format!(
                    "csflow: layer {} gave {dims:?} at scale {scale}, expected [{channels}, {side}, {side}]",
                    settings.layer
                )));
            }
            for (image, values) in
                result.iter_mut().zip(tensor_to_vec(output).chunks_exact(channels * side * side))
            {
                image.push(values.to_vec());
            }
        }
        Ok(result)
    }
}

/// The flow's architecture for `settings` on features of `shapes`.
fn shape_of(settings: &CsflowSettings, shapes: &[(usize, usize)]) -> Result<CsflowShape> {
    let channels = shapes.first().map(|s| s.0).unwrap_or(0);
    if shapes.iter().any(|s| s.0 != channels) {
        return Err(VigilError::invalid(format!(
            "csflow: every scale needs the same channels, got {shapes:?}"
        )));
    }
    let shape = CsflowShape {
        channels,
        sides: shapes.iter().map(|&(_, side)| side).collect(),
        blocks: settings.coupling_blocks,
        hidden: settings.hidden_channels,
        kernel: settings.kernel_size,
        last_kernel: settings.last_kernel_size,
        clamp: settings.clamp,
    };
    shape.check()?;
    Ok(shape)
}

/// CS-Flow: [`Detector`] with method name "csflow".
pub struct CsflowDetector {
    settings: CsflowSettings,
    features: Option<Features>,
    model: Option<CsflowModel>,
    /// Mean training loss (the official one, per latent dimension) of each epoch of the last fit.
    pub loss_history: Vec<f32>,
}

impl CsflowDetector {
    pub fn new(settings: CsflowSettings) -> Result<Self> {
        settings.validate()?;
        Ok(CsflowDetector { settings, features: None, model: None, loss_history: Vec::new() })
    }

    /// Rebuilds a fitted model from [`Detector::settings`] and [`Detector::state`].
    pub fn load(settings: &serde_json::Value, state: &TensorBag) -> Result<Self> {
        let settings: CsflowSettings = serde_json::from_value(settings.clone())
            .map_err(|e| VigilError::Model(format!("csflow settings: {e}")))?;
        settings.validate()?;
        let features = Features::new(&settings)?;
        let model = CsflowModel::load(&shape_of(&settings, &features.shapes)?, state, &default_device())?;
        Ok(CsflowDetector {
            settings,
            features: Some(features),
            model: Some(model),
            loss_history: Vec::new(),
        })
    }

    pub fn settings_struct(&self) -> &CsflowSettings {
        &self.settings
    }

    fn fitted(&self) -> Result<(&Features, &CsflowModel)> {
        match (&self.features, &self.model) {
            (Some(f), Some(model)) => Ok((f, model)),
            _ => Err(VigilError::Model("csflow: score called before fit or load".into())),
        }
    }
}

/// Trains CS-Flow's flow on backbone features ([`train_flow_with`]): the official loss
/// mean_b(½‖z‖² − log|det J|) divided by the latent dimensions, Adam with the settings' constants,
/// gradients clipped to the settings' joint norm. Returns the inference-side model and the mean
/// loss of each epoch. `session_limit` and `training_set` as [`vigil_flow::train_flow`].
pub fn train_csflow(
    settings: &CsflowSettings,
    data: &TrainingFeatures,
    ctx: &FitContext,
    session_limit: Option<usize>,
    training_set: Option<DataFingerprint>,
) -> Result<(CsflowModel, Vec<f32>)> {
    settings.validate()?;
    let shape = shape_of(settings, data.shapes)?;
    let fit = FlowFit {
        method: "csflow",
        settings: serde_json::to_value(CsflowSpec::complete(settings))
            .map_err(|e| VigilError::Model(format!("csflow settings: {e}")))?,
        epochs: settings.epochs,
        batch_size: settings.batch_size,
        checkpoint_every: settings.checkpoint_every,
        weight_decay: settings.weight_decay as f32,
        learning_rate: &|_, _| settings.learning_rate,
        z_weight: &|_| 1.0,
    };
    let options = FlowOptions {
        beta1: settings.beta1,
        beta2: settings.beta2,
        epsilon: settings.epsilon,
        max_grad_norm: settings.max_grad_norm,
        loss_factor: 1.0 / shape.dimensions() as f32,
    };
    let trained = train_flow_with(
        &fit,
        &options,
        data,
        ctx,
        session_limit,
        training_set,
        |device| CsflowModel::new(&shape, ctx.seed, device),
        |bag, device| CsflowModel::load(&shape, bag, device),
    )?;
    let losses = trained.epoch_losses(settings.batch_size, data.values.len(), 1);
    // Inference runs without the autodiff graph: rebuild the model from its learned state.
    let model = CsflowModel::load(&shape, &trained.state, &default_device())?;
    Ok((model, losses))
}

impl Detector for CsflowDetector {
    fn method(&self) -> &'static str {
        "csflow"
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
            return Err(VigilError::invalid("csflow: no training images"));
        }
        let features = Features::new(&self.settings)?;
        // Ignored regions are left out of the loss: their positions' ½‖z‖² and log-det shares.
        let (extracted, position_weights) =
            extract_training_features("csflow", train, EXTRACT_CHUNK, &features.shapes, |images| {
                features.extract(images, &self.settings)
            })?;
        let data = TrainingFeatures {
            values: &extracted,
            shapes: &features.shapes,
            position_weights: position_weights.as_deref(),
        };
        let training_set = ctx.checkpoint_dir.as_ref().map(|_| train.fingerprint()).transpose()?;
        let (model, losses) = train_csflow(&self.settings, &data, ctx, None, training_set)?;
        self.loss_history = losses;
        self.model = Some(model);
        self.features = Some(features);
        Ok(())
    }

    fn score(&self, image: &Image, ignore: Option<&Mask>) -> Result<ScoreOutput> {
        if let Some(mask) = ignore {
            mask.check_fits(image, "csflow")?;
        }
        let (features, model) = self.fitted()?;
        let raw = features.extract(std::slice::from_ref(image), &self.settings)?.remove(0);
        let device = default_device();
        let inputs = raw
            .into_iter()
            .zip(&features.shapes)
            .map(|(data, &(c, side))| Tensor::from_data(TensorData::new(data, [1, c, side, side]), &device))
            .collect();
        let latents = model.latents(inputs);
        // Map (anomalib's AnomalyMapGenerator, mode "all"): the product over scales of the
        // bilinearly up-sampled mean_c z². Score: the mean of z²/2 over every latent value (over
        // the kept feature cells with an ignore mask; 0 when none is kept).
        let (w, h) = (image.width, image.height);
        let mut map = Map::filled(w, h, 1.0);
        let (mut half_squares, mut count) = (0f64, 0usize);
        for z in latents {
            let [_, c, side, _] = z.dims();
            let values = tensor_to_vec(z);
            let mut squares = vec![0f32; side * side];
            for plane in values.chunks_exact(side * side) {
                for (acc, v) in squares.iter_mut().zip(plane) {
                    *acc += v * v;
                }
            }
            let kept = ignore.map(|m| kept_positions(m, side));
            for (p, s) in squares.iter().enumerate() {
                if kept.as_ref().is_none_or(|k| k[p] != 0.0) {
                    half_squares += 0.5 * *s as f64;
                    count += c;
                }
            }
            let mean: Vec<f32> = squares.iter().map(|s| s / c as f32).collect();
            let up = Map { width: side, height: side, data: mean }.resize_bilinear(w, h);
            for (acc, v) in map.data.iter_mut().zip(&up.data) {
                *acc *= v;
            }
        }
        map.check_finite("csflow")?;
        let image_score = if count == 0 { 0.0 } else { (half_squares / count as f64) as f32 };
        if !image_score.is_finite() {
            return Err(VigilError::Model("csflow: the image score is not finite".into()));
        }
        Ok(ScoreOutput { map, image_score: Some(image_score), log10_nfa: None })
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(CsflowSpec::complete(&self.settings)).expect("settings serialise")
    }

    fn state(&self) -> Result<TensorBag> {
        let (_, model) = self.fitted()?;
        let mut bag = TensorBag::new();
        vigil_flow::TrainableFlow::save(model, &mut bag);
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

    const SHAPES: [(usize, usize); 3] = [(4, 4), (4, 2), (4, 1)];

    fn small_settings() -> CsflowSettings {
        CsflowSettings {
            epochs: 4,
            batch_size: 4,
            hidden_channels: 8,
            coupling_blocks: 2,
            checkpoint_every: 5,
            ..CsflowSettings::default()
        }
    }

    fn features<'a>(images: &'a [Vec<Vec<f32>>], shapes: &'a [(usize, usize)]) -> TrainingFeatures<'a> {
        TrainingFeatures { values: images, shapes, position_weights: None }
    }

    #[test]
    fn training_lowers_the_loss_and_is_deterministic() {
        let images = synthetic_features(8, &SHAPES, 1);
        let settings = CsflowSettings { epochs: 8, learning_rate: 1e-2, ..small_settings() };
        let ctx = FitContext::default();
        let (_, losses) = train_csflow(&settings, &features(&images, &SHAPES), &ctx, None, None).unwrap();
        assert_eq!(losses.len(), 8);
        assert!(losses[7] < losses[0] - 0.1, "loss did not fall: {losses:?}");
        let (_, again) = train_csflow(&settings, &features(&images, &SHAPES), &ctx, None, None).unwrap();
        assert_eq!(losses, again);
        // A fresh flow is the identity: the first step's loss is mean ½x² of the features.
        let dims: usize = SHAPES.iter().map(|(c, s)| c * s * s).sum();
        let ones: Vec<Vec<Vec<f32>>> =
            images.iter().map(|_| SHAPES.iter().map(|&(_, s)| vec![1.0; s * s]).collect()).collect();
        let weighted = TrainingFeatures { position_weights: Some(&ones), ..features(&images, &SHAPES) };
        let (_, with_ones) = train_csflow(&settings, &weighted, &ctx, None, None).unwrap();
        for (a, b) in losses.iter().zip(&with_ones) {
            assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{losses:?} vs {with_ones:?}");
        }
        let one_step = CsflowSettings { epochs: 1, batch_size: 8, ..settings.clone() };
        let (_, first) = train_csflow(&one_step, &features(&images, &SHAPES), &ctx, None, None).unwrap();
        let expected: f32 =
            images.iter().flatten().flatten().map(|x| 0.5 * x * x).sum::<f32>() / (8 * dims) as f32;
        assert!((first[0] - expected).abs() < 1e-4 * expected, "{} vs {expected}", first[0]);
        // Clipping the gradients (far above a norm of 1e-6 here) to a norm far below Adam's ε
        // slows the steps.
        let clipped = CsflowSettings { max_grad_norm: Some(1e-6), ..settings };
        let (_, with_clip) = train_csflow(&clipped, &features(&images, &SHAPES), &ctx, None, None).unwrap();
        assert!(with_clip[7] > losses[7] + 0.05, "{with_clip:?} vs {losses:?}");
    }

    #[test]
    fn interrupted_training_resumes_to_the_same_model() {
        // 10 images in batches of 4: three steps per epoch, the last one short.
        let images = synthetic_features(10, &SHAPES, 2);
        let settings = small_settings();
        let plain = FitContext::default();
        let (straight, straight_losses) =
            train_csflow(&settings, &features(&images, &SHAPES), &plain, None, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ctx = FitContext { checkpoint_dir: Some(dir.path().to_path_buf()), ..FitContext::default() };
        let stopped = train_csflow(&settings, &features(&images, &SHAPES), &ctx, Some(7), None).unwrap_err();
        assert!(matches!(stopped, VigilError::Interrupted(_)), "{stopped}");
        let (resumed, resumed_losses) =
            train_csflow(&settings, &features(&images, &SHAPES), &ctx, None, None).unwrap();
        let bag = |model: &CsflowModel| {
            let mut bag = TensorBag::new();
            vigil_flow::TrainableFlow::save(model, &mut bag);
            bag
        };
        assert_eq!(bag(&resumed), bag(&straight));
        assert_eq!(resumed_losses, straight_losses);
        let other = CsflowSettings { epochs: 5, ..settings };
        let error =
            train_csflow(&other, &features(&images, &SHAPES), &ctx, None, None).unwrap_err().to_string();
        assert!(error.contains("csflow-train.ckpt") && error.contains("delete it"), "{error}");
    }

    #[test]
    fn training_rejects_mismatched_features() {
        let mut images = synthetic_features(2, &SHAPES, 1);
        images[1][0].pop();
        let ctx = FitContext::default();
        assert!(train_csflow(&small_settings(), &features(&images, &SHAPES), &ctx, None, None).is_err());
        assert!(train_csflow(&small_settings(), &features(&[], &SHAPES), &ctx, None, None).is_err());
        let uneven = [(4, 4), (4, 3), (4, 1)];
        let images = synthetic_features(2, &uneven, 1);
        assert!(train_csflow(&small_settings(), &features(&images, &uneven), &ctx, None, None).is_err());
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
        // MobileNetV2's stride-8 tap at 64 px: feature grids of 8, 4 and 2 (EfficientNet-Lite0 with
        // random weights hardly reacts to the defect).
        let settings = CsflowSettings {
            random_weights_seed: Some(1),
            backbone: vigil_backbones::BackboneKind::MobileNetV2,
            layer: "features.6".into(),
            input_size: 64,
            hidden_channels: 32,
            epochs: 15,
            batch_size: 4,
            learning_rate: 2e-3,
            ..CsflowSettings::default()
        };
        let mut detector = CsflowDetector::new(settings).unwrap();
        assert!(detector.score(&texture(0, None), None).is_err(), "unfitted detectors refuse to score");
        detector.fit(&train, &FitContext::default()).unwrap();
        assert!(detector.loss_history[14] < detector.loss_history[0], "{:?}", detector.loss_history);
        let normal: Vec<f32> = (100..106)
            .map(|i| detector.score(&texture(i, None), None).unwrap().image_score.unwrap())
            .collect();
        let defect = (40, 12, 12);
        for i in 200..204 {
            let image = texture(i, Some(defect));
            let out = detector.score(&image, None).unwrap();
            let score = out.image_score.unwrap();
            assert!(out.map.data.iter().all(|v| *v >= 0.0));
            assert!(normal.iter().all(|&n| score > n), "defect {score} vs normals {normal:?}");
            // The map's peak lies on the defect (within the coarsest scale's cell).
            let peak = out.map.data.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            let (px, py) = (peak % 64, peak / 64);
            assert!((24..64).contains(&px) && py < 40, "peak at ({px}, {py})");
            // Ignoring the right half takes the defect out of the image score.
            let mut mask = Mask::empty(64, 64);
            for y in 0..64 {
                for x in 32..64 {
                    mask.data[y * 64 + x] = true;
                }
            }
            let ignored = detector.score(&image, Some(&mask)).unwrap().image_score.unwrap();
            assert!(ignored < score, "{ignored} vs {score}");
            assert_eq!(
                detector
                    .score(&image, Some(&Mask { data: vec![true; 64 * 64], ..Mask::empty(64, 64) }))
                    .unwrap()
                    .image_score,
                Some(0.0)
            );
        }
        let reloaded = CsflowDetector::load(&detector.settings(), &detector.state().unwrap()).unwrap();
        let image = texture(300, Some(defect));
        let (a, b) = (reloaded.score(&image, None).unwrap(), detector.score(&image, None).unwrap());
        assert_eq!(a.map, b.map);
        assert_eq!(a.image_score, b.image_score);
    }

    #[test]
    fn paper_preset_taps_efficientnet_b5_and_names_the_weights_it_needs() {
        use crate::settings::Preset;
        use vigil_backbones::{default_weights_path, BackboneKind};
        let paper = CsflowSettings::of_preset(Preset::Paper);
        match default_weights_path(BackboneKind::EfficientNetB5) {
            // No B5 weights are shipped: the error says what is missing and where to get it.
            None => {
                let error = Features::new(&paper).err().unwrap().to_string();
                for needed in ["efficientnet_b5", "\"weights\"", "IMAGENET1K_V1", "VIGIL_WEIGHTS_DIR"] {
                    assert!(error.contains(needed), "{needed} not in: {error}");
                }
            }
            Some(_) => assert_eq!(Features::new(&paper).unwrap().shapes[0], (304, 24)),
        }
        // The paper's tap with random weights at 128 px: 304 channels on grids of 4, 2 and 1.
        let settings = CsflowSettings { input_size: 128, random_weights_seed: Some(1), ..paper };
        let features = Features::new(&settings).unwrap();
        assert_eq!(features.shapes, [(304, 4), (304, 2), (304, 1)]);
        let extracted = features.extract(&[texture(0, None)], &settings).unwrap();
        let sizes: Vec<usize> = extracted[0].iter().map(Vec::len).collect();
        assert_eq!(sizes, [304 * 16, 304 * 4, 304]);
        assert!(extracted[0].iter().flatten().all(|v| v.is_finite()));
    }

    #[test]
    fn bad_settings_and_mismatched_masks_are_refused() {
        let zero = serde_json::json!({ "batch_size": 0 });
        assert!(CsflowDetector::load(&zero, &TensorBag::new()).is_err());
        let odd =
            CsflowSettings { input_size: 96, random_weights_seed: Some(1), ..CsflowSettings::default() };
        let error = Features::new(&odd).err().unwrap().to_string();
        assert!(error.contains("multiple of 64"), "{error}");
        let mut detector = CsflowDetector::new(CsflowSettings {
            random_weights_seed: Some(1),
            input_size: 64,
            epochs: 1,
            hidden_channels: 4,
            coupling_blocks: 1,
            ..CsflowSettings::default()
        })
        .unwrap();
        detector.fit(&InMemorySource::new(vec![texture(0, None); 2]), &FitContext::default()).unwrap();
        let error = detector.score(&texture(1, None), Some(&Mask::empty(8, 8))).unwrap_err().to_string();
        assert!(error.contains("ignore mask"), "{error}");
        let missing =
            CsflowDetector::load(&detector.settings(), &TensorBag::new()).err().unwrap().to_string();
        assert!(missing.contains("blocks.0"), "{missing}");
    }
}
