//! FastFlow as a vigil [`Detector`]: frozen backbone features at several strides, a trainable
//! LayerNorm and an independent 2D flow per scale trained by maximum likelihood on normal
//! images, and the likelihood anomaly map.

use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use vigil_backbones::Backbone;
use vigil_core::{
    ChannelMode, DataFingerprint, Detector, FitContext, Image, ImageSource, Map, Mask, Result, ScoreOutput,
    TensorBag, VigilError,
};
use vigil_flow::{kept_positions, nll_loss};
use vigil_nn::train::{run_training, LoopConfig, TrainTask};
use vigil_nn::{
    adam, default_device, optimizer_bytes, restore_optimizer, stable_param_ids, training_device, Checkpoint,
};

use crate::model::FastflowModel;
use crate::settings::{FastflowSettings, FastflowSpec};

/// The checkpoint's file name inside `FitContext::checkpoint_dir`.
const CHECKPOINT_FILE: &str = "fastflow-train.ckpt";
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

fn batch_tensor(
    images: &[&Vec<Vec<f32>>],
    scale: usize,
    shape: (usize, usize),
    device: &Device,
) -> Tensor<4> {
    let (channels, side) = shape;
    let mut data = Vec::with_capacity(images.len() * channels * side * side);
    for image in images {
        data.extend_from_slice(&image[scale]);
    }
    Tensor::from_data(TensorData::new(data, [images.len(), channels, side, side]), device)
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

/// Training features: `values[i][scale]` channel-major, shapes (channels, side) per scale, and
/// optionally per image and scale the weight of each position in the loss (0 where the ignore
/// mask touches the position's cell, 1 elsewhere).
pub struct TrainingFeatures<'a> {
    pub values: &'a [Vec<Vec<f32>>],
    pub shapes: &'a [(usize, usize)],
    pub position_weights: Option<&'a [Vec<Vec<f32>>]>,
}

/// Trains FastFlow's norms and flows on raw backbone features. Returns the inference-side model
/// and the mean loss of each epoch. With a checkpoint folder in `ctx`, the state is written every
/// `checkpoint_every` steps and a later call with the same folder resumes from it exactly; with
/// `session_limit`, the session stops (after writing a checkpoint) once that many steps are done
/// in total, returning [`VigilError::Interrupted`]. `training_set` is recorded in the checkpoint so
/// that a resume on other images is refused.
pub fn train_fastflow(
    settings: &FastflowSettings,
    data: &TrainingFeatures,
    ctx: &FitContext,
    session_limit: Option<usize>,
    training_set: Option<DataFingerprint>,
) -> Result<(FastflowModel, Vec<f32>)> {
    settings.validate()?;
    let (images, shapes) = (data.values, data.shapes);
    if images.is_empty() {
        return Err(VigilError::invalid("fastflow: no training images"));
    }
    let matches = |v: &[Vec<f32>], per_position: usize| {
        v.len() == shapes.len()
            && v.iter().zip(shapes).all(|(d, (c, s))| d.len() == (*c).min(per_position) * s * s)
    };
    if let Some(i) = images.iter().position(|image| !matches(image, usize::MAX)) {
        return Err(VigilError::invalid(format!(
            "fastflow: features of training image {i} do not match the scales"
        )));
    }
    if let Some(weights) = data.position_weights {
        if weights.len() != images.len() || !weights.iter().all(|w| matches(w, 1)) {
            return Err(VigilError::invalid("fastflow: position weights do not match the training features"));
        }
    }
    let checkpoint_path = ctx.checkpoint_dir.as_ref().map(|d| d.join(CHECKPOINT_FILE));
    if session_limit.is_some() && checkpoint_path.is_none() {
        return Err(VigilError::Config(
            "a session step limit needs a checkpoint folder to resume from".into(),
        ));
    }
    let resume = match &checkpoint_path {
        Some(path) => Checkpoint::read_if_exists(path)?,
        None => None,
    };
    // What a checkpoint must agree with to be resumed.
    let left_out: Option<Vec<usize>> = data.position_weights.map(|weights| {
        (0..shapes.len())
            .map(|l| weights.iter().map(|w| w[l].iter().filter(|&&v| v == 0.0).count()).sum())
            .collect()
    });
    let run = serde_json::json!({
        "settings": FastflowSpec::complete(settings),
        "images": images.len(),
        "shapes": shapes,
        "left_out_positions": left_out,
    });
    let device = training_device();
    let mut model =
        FastflowModel::new(shapes, settings.flow_steps, settings.conv3x3_only, ctx.seed, &device)?;
    let mut optimizer = adam(settings.weight_decay as f32);
    if let (Some(ck), Some(path)) = (&resume, &checkpoint_path) {
        if ck.meta.get("run") != Some(&run) || ck.seed != ctx.seed {
            return Err(VigilError::file(
                path,
                "was written by a run with other settings, data or seed; delete it to start over",
            ));
        }
        model = FastflowModel::load(shapes, settings.flow_steps, settings.conv3x3_only, &ck.weights, &device)
            .map_err(|e| VigilError::file(path, e.to_string()))?;
        let bytes =
            ck.optimizers.first().ok_or_else(|| VigilError::file(path, "holds no optimiser state"))?;
        optimizer = restore_optimizer(optimizer, bytes)?;
    }
    let batches_per_epoch = images.len().div_ceil(settings.batch_size);
    let total_steps = settings.epochs * batches_per_epoch;
    let mut task = FastflowTask {
        model: Some(stable_param_ids(model)),
        optimizer,
        settings,
        data,
        seed: ctx.seed,
        run,
        batches_per_epoch,
        order: None,
        device,
    };
    let mut config = LoopConfig::new(total_steps, "fastflow");
    config.checkpoint_every = if checkpoint_path.is_some() { settings.checkpoint_every } else { 0 };
    config.checkpoint_path = checkpoint_path;
    config.session_limit = session_limit;
    config.show_progress = ctx.show_progress;
    config.data = training_set;
    let outcome = run_training(&mut task, &config, resume.as_ref())?;
    if !outcome.finished {
        return Err(VigilError::Interrupted(format!(
            "fastflow training stopped after step {} of {total_steps}; fit again with the same checkpoint folder \
             to resume",
            outcome.steps_done
        )));
    }
    // Per epoch: the batch losses weighted by batch size.
    let losses = outcome
        .state
        .losses
        .chunks(batches_per_epoch)
        .map(|epoch| {
            let total: f32 = epoch
                .iter()
                .enumerate()
                .map(|(b, loss)| {
                    loss * settings.batch_size.min(images.len() - b * settings.batch_size) as f32
                })
                .sum();
            total / images.len() as f32
        })
        .collect();
    // Inference runs without the autodiff graph: rebuild the model from its learned state.
    let mut bag = TensorBag::new();
    task.model.as_ref().expect("model present after training").save(&mut bag);
    let model =
        FastflowModel::load(shapes, settings.flow_steps, settings.conv3x3_only, &bag, &default_device())?;
    Ok((model, losses))
}

/// The order in which epoch `epoch` of a fit with `seed` visits `images` training images (batches
/// are consecutive runs of it): a pure function of its arguments, so a resumed run draws the same
/// batches.
pub fn epoch_order(seed: u64, epoch: usize, images: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch as u64);
    let mut order: Vec<usize> = (0..images).collect();
    order.shuffle(&mut rng);
    order
}

/// One FastFlow optimiser step at a time, for the resumable training loop.
struct FastflowTask<'a> {
    model: Option<FastflowModel>,
    optimizer: ModuleOptimizer,
    settings: &'a FastflowSettings,
    data: &'a TrainingFeatures<'a>,
    seed: u64,
    run: serde_json::Value,
    batches_per_epoch: usize,
    /// The current epoch and its image order.
    order: Option<(usize, Vec<usize>)>,
    device: Device,
}

impl TrainTask for FastflowTask<'_> {
    fn step(&mut self, step: usize) -> Result<f32> {
        let epoch = step / self.batches_per_epoch;
        let images = self.data.values;
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.order = Some((epoch, epoch_order(self.seed, epoch, images.len())));
        }
        let (_, order) = self.order.as_ref().expect("order set above");
        let size = self.settings.batch_size;
        let first = (step % self.batches_per_epoch) * size;
        let members = &order[first..(first + size).min(order.len())];
        let shapes = self.data.shapes;
        let batch: Vec<&Vec<Vec<f32>>> = members.iter().map(|&i| &images[i]).collect();
        let inputs = (0..shapes.len()).map(|l| batch_tensor(&batch, l, shapes[l], &self.device)).collect();
        let weights: Option<Vec<Tensor<4>>> = self.data.position_weights.map(|all| {
            let batch: Vec<&Vec<Vec<f32>>> = members.iter().map(|&i| &all[i]).collect();
            (0..shapes.len()).map(|l| batch_tensor(&batch, l, (1, shapes[l].1), &self.device)).collect()
        });
        let model = self.model.take().expect("model present between steps");
        let (latents, log_det) = model.forward(inputs, weights.as_deref());
        // anomalib's FastflowLoss, Σ_l mean_b(½‖z_l‖² − log|det J_l|), equals the batch mean of the
        // per-sample sums since the mean is linear.
        let loss = nll_loss(&latents, log_det, weights.as_deref(), 1.0);
        let value = loss.clone().into_scalar::<f32>();
        if !value.is_finite() {
            return Err(VigilError::Model(format!("fastflow: training loss became {value} at step {step}")));
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        self.model = Some(self.optimizer.step(self.settings.learning_rate, model, grads));
        Ok(value)
    }

    fn snapshot(&self) -> Result<Checkpoint> {
        let mut weights = TensorBag::new();
        self.model.as_ref().expect("model present between steps").save(&mut weights);
        Ok(Checkpoint {
            step: 0,
            seed: self.seed,
            rng: None,
            schedule: None,
            meta: serde_json::json!({ "run": self.run }),
            weights,
            optimizers: vec![optimizer_bytes(&self.optimizer)?],
        })
    }
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
        let mut extracted = Vec::with_capacity(train.len());
        let mut masks = Vec::with_capacity(train.len());
        let indices: Vec<usize> = (0..train.len()).collect();
        for chunk in indices.chunks(EXTRACT_CHUNK) {
            let images = chunk.iter().map(|&i| train.load(i)).collect::<Result<Vec<_>>>()?;
            for (&i, image) in chunk.iter().zip(&images) {
                let mask = train.ignore_mask(i);
                if let Some(m) = &mask {
                    if (m.width, m.height) != (image.width, image.height) {
                        return Err(VigilError::invalid(format!(
                            "fastflow: training image {i} is {}x{} but its ignore mask is {}x{}",
                            image.width, image.height, m.width, m.height
                        )));
                    }
                }
                masks.push(mask);
            }
            extracted.extend(features.extract(&images, &self.settings)?);
        }
        // Ignored regions are left out of the loss: their positions' ½‖z‖² and log-det shares.
        let position_weights: Option<Vec<Vec<Vec<f32>>>> = masks.iter().any(Option::is_some).then(|| {
            masks
                .iter()
                .map(|mask| {
                    features
                        .shapes
                        .iter()
                        .map(|&(_, side)| match mask {
                            Some(m) => kept_positions(m, side),
                            None => vec![1.0; side * side],
                        })
                        .collect()
                })
                .collect()
        });
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
            if (mask.width, mask.height) != (image.width, image.height) {
                return Err(VigilError::invalid(format!(
                    "fastflow: ignore mask is {}x{} but the image is {}x{}",
                    mask.width, mask.height, image.width, image.height
                )));
            }
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
    use rand::Rng;
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
        assert!(error.contains(CHECKPOINT_FILE) && error.contains("delete it"), "{error}");
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
