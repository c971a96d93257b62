//! Reverse Distillation as a vigil [`Detector`]: a frozen pretrained encoder, and a one-class
//! bottleneck (OCBE) and reversed decoder trained on normal images to reproduce the encoder's
//! features at three scales from the bottleneck's compact embedding; where the decoder's
//! features turn away from the encoder's (1 − cosine similarity) is anomalous.

use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use vigil_backbones::Backbone;
use vigil_core::BlurBorder;
use vigil_core::{
    ChannelMode, DataFingerprint, Detector, FitContext, Image, ImageSource, Map, Mask, Result, ScoreOutput,
    TensorBag, VigilError,
};
use vigil_nn::train::{epoch_order, run_training, LoopConfig, TrainTask};
use vigil_nn::{
    default_device, optimizer_bytes, restore_optimizer, stable_param_ids, tensor_from_vec, tensor_to_vec,
    training_device, Checkpoint, OptimizerSettings,
};

use crate::model::RdModel;
use crate::settings::{RdSettings, RdSpec};

/// The checkpoint's file name inside `FitContext::checkpoint_dir`.
const CHECKPOINT_FILE: &str = "reverse_distillation-train.ckpt";
/// Images per encoder call while extracting the training features.
const EXTRACT_CHUNK: usize = 8;
/// PyTorch's `cosine_similarity` floor on each norm.
const COS_EPS: f32 = 1e-8;
/// The stream of the seeded permutation that picks the held-out validation images (distinct
/// from the epoch orders, which use streams 0, 1, ...).
const VALIDATION_STREAM: usize = usize::MAX;

/// The frozen encoder and the shapes of its three taps.
struct Encoder {
    backbone: Backbone,
    /// (channels, side) per layer, strides 4, 8, 16 (or s, 2s, 4s).
    shapes: Vec<(usize, usize)>,
}

impl Encoder {
    fn open(settings: &RdSettings) -> Result<Self> {
        settings.validate()?;
        let backbone =
            Backbone::open(settings.backbone, settings.weights.as_deref(), settings.random_weights_seed)?;
        let mut shapes = Vec::with_capacity(3);
        let mut strides = Vec::with_capacity(3);
        for layer in &settings.layers {
            let (channels, stride) = backbone.layer_info(layer)?;
            shapes.push((channels, settings.input_size / stride));
            strides.push(stride);
        }
        if strides[1] != 2 * strides[0] || strides[2] != 2 * strides[1] {
            return Err(VigilError::Config(format!(
                "reverse_distillation: the layers {:?} have strides {strides:?}; the bottleneck and decoder need \
                 three layers each at twice the previous stride",
                settings.layers
            )));
        }
        // The bottleneck halves the deepest tap once more and the decoder doubles it back.
        if !settings.input_size.is_multiple_of(2 * strides[2]) {
            return Err(VigilError::Config(format!(
                "reverse_distillation: input size {} is not a multiple of {} (twice layer {}'s stride {})",
                settings.input_size,
                2 * strides[2],
                settings.layers[2],
                strides[2]
            )));
        }
        Ok(Encoder { backbone, shapes })
    }

    fn channels(&self) -> [usize; 3] {
        [self.shapes[0].0, self.shapes[1].0, self.shapes[2].0]
    }

    /// The encoder's features of `images`, one tensor per layer.
    fn run(&self, images: &[Image], settings: &RdSettings) -> Result<Vec<Tensor<4>>> {
        let size = (settings.input_size, settings.input_size);
        let x = self.backbone.preprocess(images, size)?;
        self.backbone.extract_tensor(x, &settings.layers)
    }

    /// The encoder's features of `images`, per image and layer (channel-major planes).
    fn features(&self, images: &[Image], settings: &RdSettings) -> Result<Vec<Vec<Vec<f32>>>> {
        let features: Vec<Vec<f32>> = self.run(images, settings)?.into_iter().map(tensor_to_vec).collect();
        Ok((0..images.len())
            .map(|b| {
                features
                    .iter()
                    .zip(&self.shapes)
                    .map(|(values, &(c, side))| {
                        let len = c * side * side;
                        values[b * len..(b + 1) * len].to_vec()
                    })
                    .collect()
            })
            .collect())
    }
}

/// Per image and layer: a channel-major stack of planes (features), or one plane (weights).
pub type PerLayer = Vec<Vec<Vec<f32>>>;
/// A borrowed [`PerLayer`].
pub type PerLayerRef<'a> = &'a [Vec<Vec<f32>>];

/// Training data: the encoder's features per image and layer and optionally, per image and layer,
/// the weight of each position in the loss (0 where an ignore mask covers the position's cell
/// centre); and the same for the held-out normal images whose loss decides early stopping.
pub struct TrainingData<'a> {
    pub features: &'a [Vec<Vec<f32>>],
    /// (channels, side) per layer.
    pub shapes: &'a [(usize, usize)],
    pub position_weights: Option<&'a [Vec<Vec<f32>>]>,
    pub validation: Option<(PerLayerRef<'a>, Option<PerLayerRef<'a>>)>,
}

impl TrainingData<'_> {
    fn check(&self) -> Result<()> {
        let shapes = self.shapes;
        let matches = |v: &[Vec<f32>], per_position: usize| {
            v.len() == shapes.len()
                && v.iter().zip(shapes).all(|(d, (c, s))| d.len() == (*c).min(per_position) * s * s)
        };
        let set_matches = |features: &[Vec<Vec<f32>>], weights: Option<&[Vec<Vec<f32>>]>| {
            features.iter().all(|f| matches(f, usize::MAX))
                && weights.is_none_or(|w| w.len() == features.len() && w.iter().all(|w| matches(w, 1)))
        };
        if shapes.len() != 3 || self.features.is_empty() {
            return Err(VigilError::invalid(
                "reverse_distillation: no training features, or not three layers",
            ));
        }
        if !set_matches(self.features, self.position_weights)
            || self.validation.is_some_and(|(f, w)| f.is_empty() || !set_matches(f, w))
        {
            return Err(VigilError::invalid(
                "reverse_distillation: the training features or position weights do not match the encoder's shapes",
            ));
        }
        Ok(())
    }
}

/// Trains the bottleneck and decoder on `data`. Returns their state and the mean training loss
/// per image of each epoch. With a checkpoint folder in `ctx`, the state is written every
/// `checkpoint_every` steps and a later call with the same folder resumes from it exactly; with
/// `session_limit`, the session stops (after writing a checkpoint) once that many steps are done
/// in total, returning [`VigilError::Interrupted`]. `training_set` is recorded in the checkpoint
/// so that a resume on other images is refused. With validation data, training stops once their
/// loss has not improved for `settings.patience` epochs.
pub fn train_rd(
    settings: &RdSettings,
    data: &TrainingData,
    ctx: &FitContext,
    session_limit: Option<usize>,
    training_set: Option<DataFingerprint>,
) -> Result<(TensorBag, Vec<f32>)> {
    settings.validate()?;
    data.check()?;
    let shapes = data.shapes;
    let n = data.features.len();
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
    let left_out = |weights: Option<&[Vec<Vec<f32>>]>| -> Option<Vec<usize>> {
        weights.map(|weights| {
            (0..shapes.len())
                .map(|l| weights.iter().map(|w| w[l].iter().filter(|&&v| v == 0.0).count()).sum())
                .collect()
        })
    };
    let run = serde_json::json!({
        "settings": RdSpec::complete(settings),
        "images": n,
        "shapes": shapes,
        "left_out_positions": left_out(data.position_weights),
        "validation_images": data.validation.map(|(f, _)| f.len()),
        "validation_left_out": data.validation.and_then(|(_, w)| left_out(w)),
    });
    let device = training_device();
    let channels = [shapes[0].0, shapes[1].0, shapes[2].0];
    let mut model = RdModel::new(channels, ctx.seed, &device);
    let mut optimizer = adam(settings);
    if let (Some(ck), Some(path)) = (&resume, &checkpoint_path) {
        if ck.meta.get("run") != Some(&run) || ck.seed != ctx.seed {
            return Err(VigilError::file(
                path,
                "was written by a run with other settings, data or seed; delete it to start over",
            ));
        }
        model = RdModel::load(channels, &ck.weights, &device)
            .map_err(|e| VigilError::file(path, e.to_string()))?;
        let bytes =
            ck.optimizers.first().ok_or_else(|| VigilError::file(path, "holds no optimiser state"))?;
        optimizer = restore_optimizer(optimizer, bytes)?;
    }
    let batches_per_epoch = n.div_ceil(settings.batch_size);
    let total_steps = settings.epochs * batches_per_epoch;
    let mut task = RdTask {
        model: Some(stable_param_ids(model)),
        optimizer,
        settings,
        data,
        channels,
        seed: ctx.seed,
        run,
        batches_per_epoch,
        order: None,
        device,
    };
    let mut config = LoopConfig::new(total_steps, "reverse_distillation");
    config.checkpoint_every = if checkpoint_path.is_some() { settings.checkpoint_every } else { 0 };
    config.checkpoint_path = checkpoint_path;
    config.session_limit = session_limit;
    config.show_progress = ctx.show_progress;
    config.data = training_set;
    if data.validation.is_some() {
        config.validate_every = batches_per_epoch;
        config.patience = Some(settings.patience);
    }
    let outcome = run_training(&mut task, &config, resume.as_ref())?;
    if !outcome.finished {
        return Err(VigilError::Interrupted(format!(
            "reverse_distillation training stopped after step {} of {total_steps}; fit again with the same \
             checkpoint folder to resume",
            outcome.steps_done
        )));
    }
    // Batch losses are means over their images (anomalib's reduction): weighted by the batch
    // sizes, an epoch's losses give the mean loss per image.
    let losses = outcome
        .state
        .losses
        .chunks(batches_per_epoch)
        .map(|epoch| {
            let total: f32 = epoch
                .iter()
                .enumerate()
                .map(|(b, loss)| loss * (n - b * settings.batch_size).min(settings.batch_size) as f32)
                .sum();
            total / n as f32
        })
        .collect();
    let state = task.model.as_ref().expect("model present after training").state();
    Ok((state, losses))
}

/// anomalib's optimiser: Adam (lr 0.005, betas (0.5, 0.99), no weight decay) over the bottleneck
/// and decoder.
fn adam(settings: &RdSettings) -> ModuleOptimizer {
    OptimizerSettings { beta1: settings.beta1 as f32, beta2: settings.beta2 as f32, ..Default::default() }
        .build()
}

/// Rows of `per_image[i][layer]` for the batch members as one [B, C, side, side] tensor.
fn gather(
    per_image: &[Vec<Vec<f32>>],
    members: &[usize],
    layer: usize,
    shape: [usize; 3],
    device: &Device,
) -> Tensor<4> {
    let [c, h, w] = shape;
    let mut data = Vec::with_capacity(members.len() * c * h * w);
    for &i in members {
        data.extend_from_slice(&per_image[i][layer]);
    }
    tensor_from_vec(data, [members.len(), c, h, w], device)
}

/// PyTorch's `cosine_similarity` along dimension 1 of [B, N]: each vector divided by its norm
/// floored at 1e-8, then the dot product. [B].
fn cosine_rows(a: Tensor<2>, b: Tensor<2>) -> Tensor<1> {
    let norm = |x: &Tensor<2>| x.clone().powf_scalar(2.0).sum_dim(1).sqrt().clamp_min(COS_EPS);
    let (na, nb) = (norm(&a), norm(&b));
    let dot = (a / na) * (b / nb);
    dot.sum_dim(1).squeeze_dim(1)
}

/// anomalib's `ReverseDistillationLoss`: per layer the batch mean of 1 − cos(flatten E, flatten D)
/// (one vector per image), summed over layers. With position weights (0 or 1), the left-out
/// positions are zero in both vectors, so the cosine is the one over the kept positions.
fn rd_loss(encoder: Vec<Tensor<4>>, decoder: [Tensor<4>; 3], weights: Option<Vec<Tensor<4>>>) -> Tensor<1> {
    let mut weights = weights.map(Vec::into_iter);
    let mut loss: Option<Tensor<1>> = None;
    for (e, d) in encoder.into_iter().zip(decoder) {
        let (e, d) = match weights.as_mut().and_then(Iterator::next) {
            Some(w) => (e * w.clone(), d * w),
            None => (e, d),
        };
        let [b, c, h, w] = e.dims();
        let cos = cosine_rows(e.reshape([b, c * h * w]), d.reshape([b, c * h * w]));
        let layer = cos.neg().add_scalar(1.0).mean();
        loss = Some(match loss {
            Some(total) => total + layer,
            None => layer,
        });
    }
    loss.expect("three layers")
}

/// One Adam step of the bottleneck and decoder at a time, for the resumable training loop.
struct RdTask<'a> {
    model: Option<RdModel>,
    optimizer: ModuleOptimizer,
    settings: &'a RdSettings,
    data: &'a TrainingData<'a>,
    channels: [usize; 3],
    seed: u64,
    run: serde_json::Value,
    batches_per_epoch: usize,
    /// The current epoch and its image order.
    order: Option<(usize, Vec<usize>)>,
    device: Device,
}

impl RdTask<'_> {
    /// The encoder features (and position weights) of `members` as tensors on `device`.
    fn batch(
        &self,
        features: &[Vec<Vec<f32>>],
        weights: Option<&[Vec<Vec<f32>>]>,
        members: &[usize],
        device: &Device,
    ) -> (Vec<Tensor<4>>, Option<Vec<Tensor<4>>>) {
        let shapes = self.data.shapes;
        let inputs = shapes
            .iter()
            .enumerate()
            .map(|(l, &(c, side))| gather(features, members, l, [c, side, side], device))
            .collect();
        let weights = weights.map(|w| {
            shapes
                .iter()
                .enumerate()
                .map(|(l, &(_, side))| gather(w, members, l, [1, side, side], device))
                .collect()
        });
        (inputs, weights)
    }
}

impl TrainTask for RdTask<'_> {
    fn step(&mut self, step: usize) -> Result<f32> {
        let epoch = step / self.batches_per_epoch;
        let n = self.data.features.len();
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.order = Some((epoch, epoch_order(self.seed, epoch, n)));
        }
        let (_, order) = self.order.as_ref().expect("order set above");
        let size = self.settings.batch_size;
        let first = (step % self.batches_per_epoch) * size;
        let members = order[first..(first + size).min(n)].to_vec();
        let (inputs, weights) =
            self.batch(self.data.features, self.data.position_weights, &members, &self.device);
        let model = self.model.take().expect("model present between steps");
        let [f1, f2, f3]: [Tensor<4>; 3] = inputs.clone().try_into().expect("three layers");
        let decoded = model.forward([f1, f2, f3]);
        let loss = rd_loss(inputs, decoded, weights);
        let value = loss.clone().into_scalar::<f32>();
        if !value.is_finite() {
            return Err(VigilError::Model(format!(
                "reverse_distillation: training loss became {value} at step {step}"
            )));
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        self.model = Some(self.optimizer.step(self.settings.learning_rate, model, grads));
        Ok(value)
    }

    /// The mean loss per held-out image, by the network as it scores (batch norm on its running
    /// statistics).
    fn validate(&mut self, _steps_done: usize) -> Result<Option<f32>> {
        let Some((features, weights)) = self.data.validation else { return Ok(None) };
        let device = default_device();
        let state = self.model.as_ref().expect("model present between steps").state();
        let model = RdModel::load(self.channels, &state, &device)?;
        let indices: Vec<usize> = (0..features.len()).collect();
        let mut total = 0.0;
        for chunk in indices.chunks(self.settings.batch_size) {
            let (inputs, w) = self.batch(features, weights, chunk, &device);
            let [f1, f2, f3]: [Tensor<4>; 3] = inputs.clone().try_into().expect("three layers");
            let loss = rd_loss(inputs, model.forward([f1, f2, f3]), w).into_scalar::<f32>();
            total += loss * chunk.len() as f32;
        }
        Ok(Some(total / features.len() as f32))
    }

    fn snapshot(&self) -> Result<Checkpoint> {
        let weights = self.model.as_ref().expect("model present between steps").state();
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

/// Per position of one image's [C, side, side] features, 1 − cos over channels
/// (`1 - F.cosine_similarity(e, d)`, each vector's norm floored at 1e-8).
fn cosine_distance(e: &[f32], d: &[f32], channels: usize) -> Vec<f32> {
    let plane = e.len() / channels;
    let (mut dot, mut ne, mut nd) = (vec![0f32; plane], vec![0f32; plane], vec![0f32; plane]);
    for (ce, cd) in e.chunks_exact(plane).zip(d.chunks_exact(plane)) {
        for i in 0..plane {
            dot[i] += ce[i] * cd[i];
            ne[i] += ce[i] * ce[i];
            nd[i] += cd[i] * cd[i];
        }
    }
    (0..plane).map(|i| 1.0 - dot[i] / (ne[i].sqrt().max(COS_EPS) * nd[i].sqrt().max(COS_EPS))).collect()
}

/// Bilinear up-sampling of a `side`×`side` map to `size`×`size` with the corners aligned
/// (`F.interpolate(mode="bilinear", align_corners=True)`).
fn upsample_align_corners(map: &[f32], side: usize, size: usize) -> Vec<f32> {
    let coordinate = |i: usize| -> (usize, usize, f32) {
        if side == 1 || size == 1 {
            return (0, 0, 0.0);
        }
        let position = i as f32 * (side - 1) as f32 / (size - 1) as f32;
        let low = (position.floor() as usize).min(side - 1);
        (low, (low + 1).min(side - 1), position - low as f32)
    };
    let columns: Vec<(usize, usize, f32)> = (0..size).map(coordinate).collect();
    let mut out = Vec::with_capacity(size * size);
    for &(y0, y1, fy) in &columns {
        for &(x0, x1, fx) in &columns {
            let top = map[y0 * side + x0] * (1.0 - fx) + map[y0 * side + x1] * fx;
            let bottom = map[y1 * side + x0] * (1.0 - fx) + map[y1 * side + x1] * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

/// Reverse Distillation: [`Detector`] with method name "reverse_distillation".
pub struct RdDetector {
    settings: RdSettings,
    encoder: Option<Encoder>,
    model: Option<(RdModel, TensorBag)>,
    /// Mean training loss per image of each epoch of the last fit.
    pub loss_history: Vec<f32>,
}

impl RdDetector {
    pub fn new(settings: RdSettings) -> Result<Self> {
        settings.validate()?;
        Ok(RdDetector { settings, encoder: None, model: None, loss_history: Vec::new() })
    }

    /// Rebuilds a fitted model from [`Detector::settings`] and [`Detector::state`].
    pub fn load(settings: &serde_json::Value, state: &TensorBag) -> Result<Self> {
        let settings: RdSettings = serde_json::from_value(settings.clone())
            .map_err(|e| VigilError::Model(format!("reverse_distillation settings: {e}")))?;
        let encoder = Encoder::open(&settings)?;
        let model = RdModel::load(encoder.channels(), state, &default_device())
            .map_err(|e| VigilError::Model(format!("reverse_distillation bottleneck and decoder: {e}")))?;
        Ok(RdDetector {
            settings,
            encoder: Some(encoder),
            model: Some((model, state.clone())),
            loss_history: Vec::new(),
        })
    }

    pub fn settings_struct(&self) -> &RdSettings {
        &self.settings
    }

    fn fitted(&self) -> Result<(&Encoder, &RdModel, &TensorBag)> {
        match (&self.encoder, &self.model) {
            (Some(e), Some((m, s))) => Ok((e, m, s)),
            _ => Err(VigilError::Model("reverse_distillation: score called before fit or load".into())),
        }
    }
}

impl Detector for RdDetector {
    fn method(&self) -> &'static str {
        "reverse_distillation"
    }

    fn weights_files(&self) -> Vec<vigil_core::WeightsFile> {
        self.encoder.as_ref().and_then(|e| e.backbone.weights_file().cloned()).into_iter().collect()
    }

    fn channel_mode(&self) -> ChannelMode {
        ChannelMode::Rgb
    }

    fn fit(&mut self, train: &dyn ImageSource, ctx: &FitContext) -> Result<()> {
        self.settings.validate()?;
        let n = train.len();
        if n == 0 {
            return Err(VigilError::invalid("reverse_distillation: no training images"));
        }
        let held_out = (n as f64 * self.settings.validation_fraction).round() as usize;
        let held_out = if self.settings.validation_fraction > 0.0 { held_out.max(1) } else { 0 };
        if held_out >= n {
            return Err(VigilError::invalid(format!(
                "reverse_distillation: validation_fraction {} of {n} training images leaves none to train on",
                self.settings.validation_fraction
            )));
        }
        let encoder = Encoder::open(&self.settings)?;
        let mut features = Vec::with_capacity(n);
        let mut masks = Vec::with_capacity(n);
        let indices: Vec<usize> = (0..n).collect();
        for chunk in indices.chunks(EXTRACT_CHUNK) {
            let loaded = chunk.iter().map(|&i| train.load(i)).collect::<Result<Vec<_>>>()?;
            for (&i, image) in chunk.iter().zip(&loaded) {
                let mask = train.ignore_mask(i);
                if let Some(m) = &mask {
                    if (m.width, m.height) != (image.width, image.height) {
                        return Err(VigilError::invalid(format!(
                            "reverse_distillation: training image {i} is {}x{} but its ignore mask is {}x{}",
                            image.width, image.height, m.width, m.height
                        )));
                    }
                }
                masks.push(mask);
            }
            features.extend(encoder.features(&loaded, &self.settings)?);
        }
        // Ignored regions are left out of the loss: the positions whose cell centre they cover
        // (`Mask::kept_cells`, as PaDiM, PatchCore, the flows and STFPM leave them out).
        let weights_of = |mask: &Option<Mask>| -> Vec<Vec<f32>> {
            encoder
                .shapes
                .iter()
                .map(|&(_, side)| match mask {
                    Some(m) => {
                        m.kept_cells(side, side).into_iter().map(|kept| f32::from(u8::from(kept))).collect()
                    }
                    None => vec![1.0; side * side],
                })
                .collect()
        };
        let any_mask = masks.iter().any(Option::is_some);
        // The held-out images: the last `held_out` of a seeded permutation.
        let permutation = epoch_order(ctx.seed, VALIDATION_STREAM, n);
        let (train_ids, validation_ids) = permutation.split_at(n - held_out);
        let mut train_ids = train_ids.to_vec();
        train_ids.sort_unstable();
        let pick = |ids: &[usize]| -> (PerLayer, Option<PerLayer>) {
            let f = ids.iter().map(|&i| features[i].clone()).collect();
            let w = any_mask.then(|| ids.iter().map(|&i| weights_of(&masks[i])).collect());
            (f, w)
        };
        let (train_features, train_weights) = pick(&train_ids);
        let (validation_features, validation_weights) = pick(validation_ids);
        drop(features);
        let data = TrainingData {
            features: &train_features,
            shapes: &encoder.shapes,
            position_weights: train_weights.as_deref(),
            validation: (held_out > 0).then_some((&validation_features[..], validation_weights.as_deref())),
        };
        let training_set = ctx.checkpoint_dir.as_ref().map(|_| train.fingerprint()).transpose()?;
        let (state, losses) = train_rd(&self.settings, &data, ctx, None, training_set)?;
        let model = RdModel::load(encoder.channels(), &state, &default_device())?;
        self.model = Some((model, state));
        self.loss_history = losses;
        self.encoder = Some(encoder);
        Ok(())
    }

    fn score(&self, image: &Image, ignore: Option<&Mask>) -> Result<ScoreOutput> {
        if let Some(mask) = ignore {
            mask.check_fits(image, "reverse_distillation")?;
        }
        let (encoder, model, _) = self.fitted()?;
        let features = encoder.run(std::slice::from_ref(image), &self.settings)?;
        let [f1, f2, f3]: [Tensor<4>; 3] = features.clone().try_into().map_err(|_| {
            VigilError::Model("reverse_distillation: the encoder did not return three layers".into())
        })?;
        let decoded = model.forward([f1, f2, f3]);
        // anomalib's AnomalyMapGenerator (mode "add"): per layer 1 − cos over channels,
        // bilinearly up-sampled with aligned corners to the input size, summed; then a Gaussian
        // blur (σ 4, 33 taps, reflected border); then to the image's size.
        let size = self.settings.input_size;
        let mut map = Map::filled(size, size, 0.0);
        for ((e, d), &(channels, side)) in features.into_iter().zip(decoded).zip(&encoder.shapes) {
            let distance = cosine_distance(&tensor_to_vec(e), &tensor_to_vec(d), channels);
            let up = upsample_align_corners(&distance, side, size);
            map.data.iter_mut().zip(&up).for_each(|(m, v)| *m += v);
        }
        let map = map
            .gaussian_blur_with(self.settings.blur_sigma as f32, BlurBorder::WholeSample)
            .resize_bilinear(image.width, image.height);
        map.check_finite("reverse_distillation")?;
        // anomalib's score: the map's maximum; with an ignore mask, over the kept pixels (0, the
        // least anomalous value, when every pixel is ignored).
        let image_score = match ignore {
            None => map.max(),
            Some(mask) => map
                .data
                .iter()
                .zip(&mask.data)
                .filter(|(_, &ignored)| !ignored)
                .map(|(&v, _)| v)
                .fold(0.0, f32::max),
        };
        Ok(ScoreOutput { map, image_score: Some(image_score), log10_nfa: None })
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(RdSpec::complete(&self.settings)).expect("settings serialise")
    }

    fn state(&self) -> Result<TensorBag> {
        let (_, _, state) = self.fitted()?;
        Ok(state.clone())
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use vigil_core::InMemorySource;

    use super::*;

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

    fn small_settings() -> RdSettings {
        RdSettings {
            random_weights_seed: Some(1),
            input_size: 64,
            epochs: 3,
            batch_size: 4,
            checkpoint_every: 2,
            ..RdSettings::default()
        }
    }

    /// With the shipped MobileNetV2 as encoder. Skipped when the shared folder is absent, failed
    /// instead with VIGIL_REQUIRE_SHARED=1.
    #[test]
    fn fit_lowers_the_loss_scores_a_defect_above_the_normals_and_reloads_the_same() {
        let Some(weights) =
            vigil_core::shared_data::shared_path("weights/mobilenet_v2/mobilenet_v2.safetensors")
        else {
            return;
        };
        let train = InMemorySource::new((0..12).map(|i| texture(i, None)).collect());
        let settings =
            RdSettings { weights: Some(weights), random_weights_seed: None, epochs: 15, ..small_settings() };
        let mut detector = RdDetector::new(settings).unwrap();
        assert!(detector.score(&texture(0, None), None).is_err(), "unfitted detectors refuse to score");
        detector.fit(&train, &FitContext::default()).unwrap();
        let losses = &detector.loss_history;
        assert_eq!(losses.len(), 15);
        assert!(losses[14] < 0.5 * losses[0], "loss did not fall: {losses:?}");
        let normal: Vec<f32> = (100..106)
            .map(|i| detector.score(&texture(i, None), None).unwrap().image_score.unwrap())
            .collect();
        let defect = (40, 12, 10);
        for i in 200..204 {
            let image = texture(i, Some(defect));
            let out = detector.score(&image, None).unwrap();
            let score = out.image_score.unwrap();
            assert_eq!(score, out.map.max());
            assert!(normal.iter().all(|&n| score > n), "defect {score} vs normals {normal:?}");
            // The map's peak lies on the defect (within the coarsest layer's cell and the blur).
            let peak = out.map.data.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            let (px, py) = (peak % 64, peak / 64);
            assert!((24..64).contains(&px) && py < 38, "peak at ({px}, {py})");
            // Ignoring the defect's region takes it out of the image score.
            let mut mask = Mask::empty(64, 64);
            for y in 0..40 {
                for x in 24..64 {
                    mask.data[y * 64 + x] = true;
                }
            }
            let ignored = detector.score(&image, Some(&mask)).unwrap().image_score.unwrap();
            assert!(ignored < score, "{ignored} vs {score}");
        }
        let reloaded = RdDetector::load(&detector.settings(), &detector.state().unwrap()).unwrap();
        let image = texture(300, Some(defect));
        assert_eq!(reloaded.score(&image, None).unwrap().map, detector.score(&image, None).unwrap().map);
    }

    /// The encoder features of `n` textures, and the encoder.
    fn training_data(settings: &RdSettings, n: u64) -> (PerLayer, Encoder) {
        let encoder = Encoder::open(settings).unwrap();
        let images: Vec<Image> = (0..n).map(|i| texture(i, None)).collect();
        (encoder.features(&images, settings).unwrap(), encoder)
    }

    /// A fit killed mid-way (the session limit) and resumed from its checkpoint ends with the
    /// same bottleneck and decoder, bit for bit, and the same losses as an uninterrupted fit; also
    /// with a validation set, whose record travels in the checkpoint.
    #[test]
    fn interrupted_training_resumes_to_the_same_weights() {
        let settings = small_settings();
        // 10 images in batches of 4: three steps per epoch, the last one short.
        let (features, encoder) = training_data(&settings, 12);
        let (train, held_out) = features.split_at(10);
        for validation in [None, Some((held_out, None))] {
            let data =
                TrainingData { features: train, shapes: &encoder.shapes, position_weights: None, validation };
            let plain = FitContext::default();
            let (straight, straight_losses) = train_rd(&settings, &data, &plain, None, None).unwrap();
            assert_eq!(straight_losses.len(), 3);
            let dir = tempfile::tempdir().unwrap();
            let ctx = FitContext { checkpoint_dir: Some(dir.path().to_path_buf()), ..FitContext::default() };
            let stopped = train_rd(&settings, &data, &ctx, Some(5), None).unwrap_err();
            assert!(matches!(stopped, VigilError::Interrupted(_)), "{stopped}");
            let (resumed, resumed_losses) = train_rd(&settings, &data, &ctx, None, None).unwrap();
            assert_eq!(resumed, straight);
            assert_eq!(resumed_losses, straight_losses);
            // Another seed trains other weights; other settings refuse the checkpoint.
            let other_seed = FitContext { seed: 1, ..FitContext::default() };
            assert_ne!(train_rd(&settings, &data, &other_seed, None, None).unwrap().0, straight);
            let other = RdSettings { epochs: 4, ..settings.clone() };
            let error = train_rd(&other, &data, &ctx, None, None).unwrap_err().to_string();
            assert!(error.contains(CHECKPOINT_FILE) && error.contains("delete it"), "{error}");
            // Mismatched features are refused.
            let short = TrainingData { features: &train[..9], shapes: &encoder.shapes[..2], ..data };
            assert!(train_rd(&settings, &short, &plain, None, None).is_err());
        }
    }

    /// Position weights take positions out of the cosine: all ones is the plain fit bit for bit,
    /// zeros change the loss.
    #[test]
    fn position_weights_leave_positions_out_of_the_loss() {
        let settings = RdSettings { epochs: 1, ..small_settings() };
        let (features, encoder) = training_data(&settings, 4);
        let ctx = FitContext::default();
        let weights = |keep: fn(usize, usize) -> bool| -> PerLayer {
            (0..4)
                .map(|_| {
                    encoder
                        .shapes
                        .iter()
                        .map(|&(_, side)| {
                            (0..side * side).map(|i| f32::from(u8::from(keep(i, side)))).collect()
                        })
                        .collect()
                })
                .collect()
        };
        let train = |w: Option<&[Vec<Vec<f32>>]>| {
            let data = TrainingData {
                features: &features,
                shapes: &encoder.shapes,
                position_weights: w,
                validation: None,
            };
            train_rd(&settings, &data, &ctx, None, None).unwrap()
        };
        let (plain_state, plain) = train(None);
        let ones = weights(|_, _| true);
        assert_eq!(train(Some(&ones)), (plain_state.clone(), plain.clone()));
        let top_half = weights(|i, side| i < side * side / 2);
        let (halved_state, halved) = train(Some(&top_half));
        assert_ne!(halved_state, plain_state);
        assert_ne!(halved, plain);
    }

    /// The loss and the map agree with their definitions on hand-made features: identical
    /// features give 0, opposite ones 2 per layer.
    #[test]
    fn loss_and_distance_follow_their_definitions() {
        let device = Device::flex();
        let e = vec![3.0, 0.0, 0.0, 0.0, 4.0, 1.0];
        assert_eq!(cosine_distance(&e, &e, 3), vec![0.0, 0.0]);
        let opposite: Vec<f32> = e.iter().map(|v| -v).collect();
        assert_eq!(cosine_distance(&e, &opposite, 3), vec![2.0, 2.0]);
        let t = |v: &[f32]| tensor_from_vec(v.to_vec(), [1, 3, 1, 2], &device);
        let same = rd_loss(vec![t(&e), t(&e), t(&e)], [t(&e), t(&e), t(&e)], None).into_scalar::<f32>();
        assert!(same.abs() < 1e-6, "{same}");
        let apart =
            rd_loss(vec![t(&e), t(&e), t(&e)], [t(&opposite), t(&e), t(&e)], None).into_scalar::<f32>();
        assert!((apart - 2.0).abs() < 1e-6, "{apart}");
        // Align-corners up-sampling keeps the corners and interpolates linearly between them.
        let up = upsample_align_corners(&[0.0, 1.0, 2.0, 3.0], 2, 3);
        assert_eq!(up, vec![0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0, 2.5, 3.0]);
    }

    #[test]
    fn early_stopping_holds_out_normal_images() {
        // Four epochs with patience 1: training ends once the held-out loss stops falling, so
        // never more epochs than configured, and the same fit twice gives the same weights.
        let settings = RdSettings { epochs: 4, validation_fraction: 0.25, patience: 1, ..small_settings() };
        let train = InMemorySource::new((0..8).map(|i| texture(i, None)).collect());
        let fit = || {
            let mut detector = RdDetector::new(settings.clone()).unwrap();
            detector.fit(&train, &FitContext::default()).unwrap();
            detector
        };
        let (a, b) = (fit(), fit());
        assert!((1..=4).contains(&a.loss_history.len()), "{:?}", a.loss_history);
        assert_eq!(a.state().unwrap(), b.state().unwrap());
        let all_out = RdSettings { validation_fraction: 0.95, ..settings.clone() };
        let mut detector = RdDetector::new(all_out).unwrap();
        let error = detector.fit(&InMemorySource::new(vec![texture(0, None)]), &FitContext::default());
        assert!(error.unwrap_err().to_string().contains("leaves none"));
    }

    #[test]
    fn bad_settings_states_and_masks_are_refused() {
        let zero = serde_json::json!({ "batch_size": 0 });
        assert!(RdDetector::load(&zero, &TensorBag::new()).is_err());
        let odd = RdSettings { input_size: 48, ..small_settings() };
        let error = Encoder::open(&odd).err().unwrap().to_string();
        assert!(error.contains("multiple of 32"), "{error}");
        let skipping = RdSettings {
            layers: vec!["features.3".into(), "features.13".into(), "features.17".into()],
            ..small_settings()
        };
        let error = Encoder::open(&skipping).err().unwrap().to_string();
        assert!(error.contains("twice the previous stride"), "{error}");
        let settings = RdSettings { epochs: 1, ..small_settings() };
        let mut detector = RdDetector::new(settings).unwrap();
        detector.fit(&InMemorySource::new(vec![texture(0, None); 2]), &FitContext::default()).unwrap();
        let error = detector.score(&texture(1, None), Some(&Mask::empty(8, 8))).unwrap_err().to_string();
        assert!(error.contains("ignore mask"), "{error}");
        // A state missing a tensor, or with one too many, does not load.
        let state = detector.state().unwrap();
        let json = detector.settings();
        let mut holed = TensorBag::new();
        for name in state.names().filter(|n| !n.starts_with("decoder.1.")) {
            holed.put_f32(name, state.shape(name).unwrap(), state.f32(name, None).unwrap());
        }
        let error = RdDetector::load(&json, &holed).err().unwrap().to_string();
        assert!(error.contains("decoder.1."), "{error}");
        let mut extra = state.clone();
        extra.put_f32("decoder.3.0.conv2.weight", &[1], vec![0.0]);
        assert!(RdDetector::load(&json, &extra).is_err());
        // The loaded detector scores as the fitted one.
        let loaded = RdDetector::load(&json, &state).unwrap();
        let image = texture(5, None);
        assert_eq!(loaded.score(&image, None).unwrap().map, detector.score(&image, None).unwrap().map);
    }
}
