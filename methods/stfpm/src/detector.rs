//! STFPM as a vigil [`Detector`]: a frozen pretrained teacher and a student of the same
//! architecture trained from random initialisation to reproduce the teacher's channel-normalised
//! features at several layers on normal images; where they disagree is anomalous.

use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use vigil_backbones::{Backbone, TrainableBackbone};
use vigil_core::{
    ChannelMode, DataFingerprint, Detector, FitContext, Image, ImageSource, Map, Mask, Result, ScoreOutput,
    TensorBag, VigilError,
};
use vigil_nn::train::{run_training, LoopConfig, TrainTask};
use vigil_nn::{
    default_device, optimizer_bytes, restore_optimizer, stable_param_ids, tensor_from_vec, tensor_to_vec,
    training_device, Checkpoint,
};

use crate::settings::{StfpmSettings, StfpmSpec};

/// The checkpoint's file name inside `FitContext::checkpoint_dir`.
const CHECKPOINT_FILE: &str = "stfpm-train.ckpt";
/// Images per teacher call while extracting the training targets.
const EXTRACT_CHUNK: usize = 8;
/// `F.normalize`'s floor on the norm.
const NORM_EPS: f32 = 1e-12;

/// The frozen teacher and the shapes of its taps.
struct Teacher {
    backbone: Backbone,
    /// (channels, side) per layer, in the order of `settings.layers`.
    shapes: Vec<(usize, usize)>,
    /// The deepest of the layers: where the student ends.
    deepest: String,
}

impl Teacher {
    fn open(settings: &StfpmSettings) -> Result<Self> {
        let backbone =
            Backbone::open(settings.backbone, settings.weights.as_deref(), settings.random_weights_seed)?;
        let mut shapes = Vec::with_capacity(settings.layers.len());
        for layer in &settings.layers {
            let (channels, stride) = backbone.layer_info(layer)?;
            if !settings.input_size.is_multiple_of(stride) {
                return Err(VigilError::Config(format!(
                    "stfpm: input size {} is not a multiple of layer {layer}'s stride {stride}",
                    settings.input_size
                )));
            }
            shapes.push((channels, settings.input_size / stride));
        }
        let names = backbone.layer_names();
        let position =
            |layer: &String| names.iter().position(|n| n == layer || *n == format!("_{layer}")).unwrap_or(0);
        let deepest = settings.layers.iter().max_by_key(|l| position(l)).expect("layers validated").clone();
        Ok(Teacher { backbone, shapes, deepest })
    }

    /// Normalised input batch and the teacher's features of `images`.
    fn run(&self, images: &[Image], settings: &StfpmSettings) -> Result<(Tensor<4>, Vec<Tensor<4>>)> {
        let size = (settings.input_size, settings.input_size);
        let x = self.backbone.preprocess(images, size)?;
        let features = self.backbone.extract_tensor(x.clone(), &settings.layers)?;
        Ok((x, features))
    }
}

/// Each position's channel vector divided by its L2 norm (floored at `F.normalize`'s 1e-12),
/// for one image's [C, side, side] features, channel-major.
fn normalized(values: &[f32], channels: usize) -> Vec<f32> {
    let plane = values.len() / channels;
    let mut norms = vec![0f32; plane];
    for channel in values.chunks_exact(plane) {
        for (n, v) in norms.iter_mut().zip(channel) {
            *n += v * v;
        }
    }
    norms.iter_mut().for_each(|n| *n = n.sqrt().max(NORM_EPS));
    values.iter().enumerate().map(|(i, v)| v / norms[i % plane]).collect()
}

/// `F.normalize(x, dim=1)` on a batch, differentiable: the floor is applied to the squared norm
/// (1e-24), which gives the same values and, like PyTorch's norm, a zero gradient at a zero vector.
fn normalize_channels(x: Tensor<4>) -> Tensor<4> {
    let norm = x.clone().powf_scalar(2.0).sum_dim(1).clamp_min(NORM_EPS * NORM_EPS).sqrt();
    x / norm
}

/// Training data: the normalised input images, the teacher's channel-normalised features per
/// image and layer, and optionally per image and layer the weight of each position in the loss
/// (0 where an ignore mask covers the position's cell centre).
pub struct TrainingData<'a> {
    /// One [3, input_size, input_size] image each, channel-major.
    pub images: &'a [Vec<f32>],
    pub targets: &'a [Vec<Vec<f32>>],
    /// (channels, side) per layer.
    pub shapes: &'a [(usize, usize)],
    pub position_weights: Option<&'a [Vec<Vec<f32>>]>,
}

/// Trains the student on `data`. Returns the student's state (PyTorch names) and the mean
/// training loss per image of each epoch. With a checkpoint folder in `ctx`, the state is written
/// every `checkpoint_every` steps and a later call with the same folder resumes from it exactly;
/// with `session_limit`, the session stops (after writing a checkpoint) once that many steps are
/// done in total, returning [`VigilError::Interrupted`]. `training_set` is recorded in the
/// checkpoint so that a resume on other images is refused.
pub fn train_student(
    settings: &StfpmSettings,
    last_layer: &str,
    data: &TrainingData,
    ctx: &FitContext,
    session_limit: Option<usize>,
    training_set: Option<DataFingerprint>,
) -> Result<(TensorBag, Vec<f32>)> {
    settings.validate()?;
    let shapes = data.shapes;
    let n = data.images.len();
    if n == 0 {
        return Err(VigilError::invalid("stfpm: no training images"));
    }
    let image_len = 3 * settings.input_size * settings.input_size;
    let matches = |v: &[Vec<f32>], per_position: usize| {
        v.len() == shapes.len()
            && v.iter().zip(shapes).all(|(d, (c, s))| d.len() == (*c).min(per_position) * s * s)
    };
    if data.targets.len() != n
        || data.images.iter().any(|i| i.len() != image_len)
        || data.targets.iter().any(|t| !matches(t, usize::MAX))
    {
        return Err(VigilError::invalid("stfpm: training images and teacher features do not match"));
    }
    if let Some(weights) = data.position_weights {
        if weights.len() != n || !weights.iter().all(|w| matches(w, 1)) {
            return Err(VigilError::invalid("stfpm: position weights do not match the training features"));
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
        "settings": StfpmSpec::complete(settings),
        "images": n,
        "shapes": shapes,
        "left_out_positions": left_out,
    });
    let device = training_device();
    let mut student = TrainableBackbone::new(settings.backbone, last_layer, ctx.seed, &device)?;
    for (layer, &(channels, side)) in settings.layers.iter().zip(shapes) {
        let (c, stride) = student.layer_info(layer)?;
        if (c, settings.input_size / stride) != (channels, side) {
            return Err(VigilError::invalid(format!(
                "stfpm: the student's layer {layer} is {c} channels at stride {stride}, the teacher features \
                 are {channels} x {side} x {side}"
            )));
        }
    }
    let mut optimizer = sgd(settings);
    if let (Some(ck), Some(path)) = (&resume, &checkpoint_path) {
        if ck.meta.get("run") != Some(&run) || ck.seed != ctx.seed {
            return Err(VigilError::file(
                path,
                "was written by a run with other settings, data or seed; delete it to start over",
            ));
        }
        student = student.load_state(&ck.weights).map_err(|e| VigilError::file(path, e.to_string()))?;
        let bytes =
            ck.optimizers.first().ok_or_else(|| VigilError::file(path, "holds no optimiser state"))?;
        optimizer = restore_optimizer(optimizer, bytes)?;
    }
    let batches_per_epoch = n.div_ceil(settings.batch_size);
    let total_steps = settings.epochs * batches_per_epoch;
    let mut task = StfpmTask {
        student: Some(stable_param_ids(student)),
        optimizer,
        settings,
        data,
        seed: ctx.seed,
        run,
        batches_per_epoch,
        order: None,
        device,
    };
    let mut config = LoopConfig::new(total_steps, "stfpm");
    config.checkpoint_every = if checkpoint_path.is_some() { settings.checkpoint_every } else { 0 };
    config.checkpoint_path = checkpoint_path;
    config.session_limit = session_limit;
    config.show_progress = ctx.show_progress;
    config.data = training_set;
    let outcome = run_training(&mut task, &config, resume.as_ref())?;
    if !outcome.finished {
        return Err(VigilError::Interrupted(format!(
            "stfpm training stopped after step {} of {total_steps}; fit again with the same checkpoint folder to \
             resume",
            outcome.steps_done
        )));
    }
    // Batch losses are sums over their images (anomalib's reduction), so an epoch's sum over
    // batches divided by the image count is the mean loss per image.
    let losses = outcome
        .state
        .losses
        .chunks(batches_per_epoch)
        .map(|epoch| epoch.iter().sum::<f32>() / n as f32)
        .collect();
    let state = task.student.as_ref().expect("student present after training").state();
    Ok((state, losses))
}

/// anomalib's optimiser: SGD with momentum (no dampening, no Nesterov) and L2 weight decay.
fn sgd(settings: &StfpmSettings) -> ModuleOptimizer {
    SgdConfig::new()
        .with_momentum(Some(MomentumConfig { momentum: settings.momentum, dampening: 0.0, nesterov: false }))
        .with_weight_decay(
            (settings.weight_decay > 0.0).then(|| WeightDecayConfig::new(settings.weight_decay as f32)),
        )
        .init()
}

/// The order in which epoch `epoch` of a fit with `seed` visits `images` training images (batches
/// are consecutive runs of it): a pure function of its arguments, so a resumed run draws the same
/// batches.
fn epoch_order(seed: u64, epoch: usize, images: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch as u64);
    let mut order: Vec<usize> = (0..images).collect();
    order.shuffle(&mut rng);
    order
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

/// One SGD step of the student at a time, for the resumable training loop.
struct StfpmTask<'a> {
    student: Option<TrainableBackbone>,
    optimizer: ModuleOptimizer,
    settings: &'a StfpmSettings,
    data: &'a TrainingData<'a>,
    seed: u64,
    run: serde_json::Value,
    batches_per_epoch: usize,
    /// The current epoch and its image order.
    order: Option<(usize, Vec<usize>)>,
    device: Device,
}

impl TrainTask for StfpmTask<'_> {
    fn step(&mut self, step: usize) -> Result<f32> {
        let epoch = step / self.batches_per_epoch;
        let n = self.data.images.len();
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.order = Some((epoch, epoch_order(self.seed, epoch, n)));
        }
        let (_, order) = self.order.as_ref().expect("order set above");
        let size = self.settings.batch_size;
        let first = (step % self.batches_per_epoch) * size;
        let members = &order[first..(first + size).min(n)];
        let side = self.settings.input_size;
        let mut pixels = Vec::with_capacity(members.len() * 3 * side * side);
        for &i in members {
            pixels.extend_from_slice(&self.data.images[i]);
        }
        let x = tensor_from_vec(pixels, [members.len(), 3, side, side], &self.device);
        let student = self.student.take().expect("student present between steps");
        let outputs = student.forward(x, &self.settings.layers)?;
        // anomalib's STFPMLoss: per layer (0.5 / (H W)) · Σ (n(T) − n(S))² summed over the batch,
        // the layers summed.
        let mut loss: Option<Tensor<1>> = None;
        for (l, (output, &(channels, side))) in outputs.into_iter().zip(self.data.shapes).enumerate() {
            let target = gather(self.data.targets, members, l, [channels, side, side], &self.device);
            let difference = target - normalize_channels(output);
            let mut squares = difference.clone() * difference;
            if let Some(weights) = self.data.position_weights {
                squares = squares * gather(weights, members, l, [1, side, side], &self.device);
            }
            let layer_loss = squares.sum().mul_scalar(0.5 / (side * side) as f64);
            loss = Some(match loss {
                Some(total) => total + layer_loss,
                None => layer_loss,
            });
        }
        let loss = loss.expect("at least one layer");
        let value = loss.clone().into_scalar::<f32>();
        if !value.is_finite() {
            return Err(VigilError::Model(format!("stfpm: training loss became {value} at step {step}")));
        }
        let grads = GradientsParams::from_grads(loss.backward(), &student);
        self.student = Some(self.optimizer.step(self.settings.learning_rate, student, grads));
        Ok(value)
    }

    fn snapshot(&self) -> Result<Checkpoint> {
        let weights = self.student.as_ref().expect("student present between steps").state();
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

/// The trained student on the inference kernels, and its state.
struct Student {
    network: Backbone,
    state: TensorBag,
}

impl Student {
    /// Checks `state` against the student the settings describe (every tensor present with its
    /// shape, nothing else) and builds the inference network from it.
    fn from_state(settings: &StfpmSettings, last_layer: &str, state: TensorBag) -> Result<Self> {
        let device = default_device();
        let expected = TrainableBackbone::new(settings.backbone, last_layer, 0, &device)?.state();
        for name in expected.names() {
            let shape = expected.shape(name)?;
            state.f32(name, Some(shape)).map_err(|e| VigilError::Model(format!("stfpm student: {e}")))?;
        }
        if let Some(extra) = state.names().find(|n| expected.shape(n).is_err()) {
            return Err(VigilError::Model(format!(
                "stfpm student: tensor '{extra}' has no place in a {} student up to {last_layer}",
                settings.backbone
            )));
        }
        let network = Backbone::from_partial_state(settings.backbone, &state, &device)?;
        Ok(Student { network, state })
    }
}

/// STFPM: [`Detector`] with method name "stfpm".
pub struct StfpmDetector {
    settings: StfpmSettings,
    teacher: Option<Teacher>,
    student: Option<Student>,
    /// Mean training loss per image of each epoch of the last fit.
    pub loss_history: Vec<f32>,
}

impl StfpmDetector {
    pub fn new(settings: StfpmSettings) -> Result<Self> {
        settings.validate()?;
        Ok(StfpmDetector { settings, teacher: None, student: None, loss_history: Vec::new() })
    }

    /// Rebuilds a fitted model from [`Detector::settings`] and [`Detector::state`].
    pub fn load(settings: &serde_json::Value, state: &TensorBag) -> Result<Self> {
        let settings: StfpmSettings = serde_json::from_value(settings.clone())
            .map_err(|e| VigilError::Model(format!("stfpm settings: {e}")))?;
        settings.validate()?;
        let teacher = Teacher::open(&settings)?;
        let student = Student::from_state(&settings, &teacher.deepest, state.clone())?;
        Ok(StfpmDetector {
            settings,
            teacher: Some(teacher),
            student: Some(student),
            loss_history: Vec::new(),
        })
    }

    pub fn settings_struct(&self) -> &StfpmSettings {
        &self.settings
    }

    fn fitted(&self) -> Result<(&Teacher, &Student)> {
        match (&self.teacher, &self.student) {
            (Some(t), Some(s)) => Ok((t, s)),
            _ => Err(VigilError::Model("stfpm: score called before fit or load".into())),
        }
    }
}

impl Detector for StfpmDetector {
    fn method(&self) -> &'static str {
        "stfpm"
    }

    fn weights_files(&self) -> Vec<vigil_core::WeightsFile> {
        self.teacher.as_ref().and_then(|t| t.backbone.weights_file().cloned()).into_iter().collect()
    }

    fn channel_mode(&self) -> ChannelMode {
        ChannelMode::Rgb
    }

    fn fit(&mut self, train: &dyn ImageSource, ctx: &FitContext) -> Result<()> {
        self.settings.validate()?;
        if train.is_empty() {
            return Err(VigilError::invalid("stfpm: no training images"));
        }
        let teacher = Teacher::open(&self.settings)?;
        let mut images = Vec::with_capacity(train.len());
        let mut targets = Vec::with_capacity(train.len());
        let mut masks = Vec::with_capacity(train.len());
        let indices: Vec<usize> = (0..train.len()).collect();
        for chunk in indices.chunks(EXTRACT_CHUNK) {
            let loaded = chunk.iter().map(|&i| train.load(i)).collect::<Result<Vec<_>>>()?;
            for (&i, image) in chunk.iter().zip(&loaded) {
                let mask = train.ignore_mask(i);
                if let Some(m) = &mask {
                    if (m.width, m.height) != (image.width, image.height) {
                        return Err(VigilError::invalid(format!(
                            "stfpm: training image {i} is {}x{} but its ignore mask is {}x{}",
                            image.width, image.height, m.width, m.height
                        )));
                    }
                }
                masks.push(mask);
            }
            let (x, features) = teacher.run(&loaded, &self.settings)?;
            let per_image = 3 * self.settings.input_size * self.settings.input_size;
            images.extend(tensor_to_vec(x).chunks_exact(per_image).map(<[f32]>::to_vec));
            let features: Vec<Vec<f32>> = features.into_iter().map(tensor_to_vec).collect();
            for b in 0..loaded.len() {
                targets.push(
                    features
                        .iter()
                        .zip(&teacher.shapes)
                        .map(|(values, &(c, side))| {
                            let len = c * side * side;
                            normalized(&values[b * len..(b + 1) * len], c)
                        })
                        .collect::<Vec<_>>(),
                );
            }
        }
        // Ignored regions are left out of the loss: the positions whose cell centre they cover
        // (`Mask::kept_cells`, as PaDiM, PatchCore and the flows leave them out).
        let position_weights: Option<Vec<Vec<Vec<f32>>>> = masks.iter().any(Option::is_some).then(|| {
            masks
                .iter()
                .map(|mask| {
                    teacher
                        .shapes
                        .iter()
                        .map(|&(_, side)| match mask {
                            Some(m) => m
                                .kept_cells(side, side)
                                .into_iter()
                                .map(|kept| f32::from(u8::from(kept)))
                                .collect(),
                            None => vec![1.0; side * side],
                        })
                        .collect()
                })
                .collect()
        });
        let data = TrainingData {
            images: &images,
            targets: &targets,
            shapes: &teacher.shapes,
            position_weights: position_weights.as_deref(),
        };
        let training_set = ctx.checkpoint_dir.as_ref().map(|_| train.fingerprint()).transpose()?;
        let (state, losses) =
            train_student(&self.settings, &teacher.deepest, &data, ctx, None, training_set)?;
        self.student = Some(Student::from_state(&self.settings, &teacher.deepest, state)?);
        self.loss_history = losses;
        self.teacher = Some(teacher);
        Ok(())
    }

    fn score(&self, image: &Image, ignore: Option<&Mask>) -> Result<ScoreOutput> {
        if let Some(mask) = ignore {
            mask.check_fits(image, "stfpm")?;
        }
        let (teacher, student) = self.fitted()?;
        let (x, teacher_features) = teacher.run(std::slice::from_ref(image), &self.settings)?;
        let student_features = student.network.extract_tensor(x, &self.settings.layers)?;
        // anomalib's AnomalyMapGenerator: per layer ½‖n(T) − n(S)‖² over channels, bilinearly
        // up-sampled to the input size; the product over layers; then to the image's size.
        let size = self.settings.input_size;
        let mut map = Map::filled(size, size, 1.0);
        for ((t, s), &(channels, side)) in
            teacher_features.into_iter().zip(student_features).zip(&teacher.shapes)
        {
            let t = normalized(&tensor_to_vec(t), channels);
            let s = normalized(&tensor_to_vec(s), channels);
            let plane = side * side;
            let mut layer = vec![0f32; plane];
            for (c_t, c_s) in t.chunks_exact(plane).zip(s.chunks_exact(plane)) {
                for ((acc, a), b) in layer.iter_mut().zip(c_t).zip(c_s) {
                    *acc += (a - b) * (a - b);
                }
            }
            layer.iter_mut().for_each(|v| *v *= 0.5);
            let up = Map { width: side, height: side, data: layer }.resize_bilinear(size, size);
            map.data.iter_mut().zip(&up.data).for_each(|(m, v)| *m *= v);
        }
        let map = map.resize_bilinear(image.width, image.height);
        map.check_finite("stfpm")?;
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
        serde_json::to_value(StfpmSpec::complete(&self.settings)).expect("settings serialise")
    }

    fn state(&self) -> Result<TensorBag> {
        let (_, student) = self.fitted()?;
        Ok(student.state.clone())
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;
    use rand::Rng;
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

    fn small_settings() -> StfpmSettings {
        StfpmSettings {
            random_weights_seed: Some(1),
            input_size: 32,
            epochs: 3,
            batch_size: 4,
            checkpoint_every: 2,
            ..StfpmSettings::default()
        }
    }

    /// With the shipped MobileNetV2 as teacher (a student copies a random teacher everywhere,
    /// defects included, so the planted-defect check needs a pretrained one). Skipped when the
    /// shared folder is absent, failed instead with VIGIL_REQUIRE_SHARED=1.
    #[test]
    fn fit_lowers_the_loss_scores_a_defect_above_the_normals_and_reloads_the_same() {
        let Some(weights) =
            vigil_core::shared_data::shared_path("weights/mobilenet_v2/mobilenet_v2.safetensors")
        else {
            return;
        };
        let train = InMemorySource::new((0..12).map(|i| texture(i, None)).collect());
        let settings = StfpmSettings {
            weights: Some(weights),
            random_weights_seed: None,
            input_size: 64,
            epochs: 20,
            ..small_settings()
        };
        let mut detector = StfpmDetector::new(settings).unwrap();
        assert!(detector.score(&texture(0, None), None).is_err(), "unfitted detectors refuse to score");
        detector.fit(&train, &FitContext::default()).unwrap();
        let losses = &detector.loss_history;
        assert_eq!(losses.len(), 20);
        assert!(losses[19] < 0.5 * losses[0], "loss did not fall: {losses:?}");
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
            // The map's peak lies on the defect (within the coarsest layer's cell).
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
            assert!(ignored < score, "{ignored} vs {score}");
        }
        let reloaded = StfpmDetector::load(&detector.settings(), &detector.state().unwrap()).unwrap();
        let image = texture(300, Some(defect));
        assert_eq!(reloaded.score(&image, None).unwrap().map, detector.score(&image, None).unwrap().map);
    }

    /// Per image and layer, one channel-major plane stack.
    type PerLayer = Vec<Vec<Vec<f32>>>;

    /// Normalised pixels and teacher targets of `n` textures, and the teacher.
    fn training_data(settings: &StfpmSettings, n: u64) -> (Vec<Vec<f32>>, PerLayer, Teacher) {
        let teacher = Teacher::open(settings).unwrap();
        let images: Vec<Image> = (0..n).map(|i| texture(i, None)).collect();
        let (x, features) = teacher.run(&images, settings).unwrap();
        let per_image = 3 * settings.input_size * settings.input_size;
        let pixels: Vec<Vec<f32>> = tensor_to_vec(x).chunks_exact(per_image).map(<[f32]>::to_vec).collect();
        let features: Vec<Vec<f32>> = features.into_iter().map(tensor_to_vec).collect();
        let targets = (0..n as usize)
            .map(|b| {
                features
                    .iter()
                    .zip(&teacher.shapes)
                    .map(|(v, &(c, side))| normalized(&v[b * c * side * side..(b + 1) * c * side * side], c))
                    .collect()
            })
            .collect();
        (pixels, targets, teacher)
    }

    /// A fit killed mid-way (the session limit) and resumed from its checkpoint ends with the
    /// same student, bit for bit, and the same losses as an uninterrupted fit.
    #[test]
    fn interrupted_training_resumes_to_the_same_student() {
        let settings = small_settings();
        // 10 images in batches of 4: three steps per epoch, the last one short.
        let (pixels, targets, teacher) = training_data(&settings, 10);
        let data = TrainingData {
            images: &pixels,
            targets: &targets,
            shapes: &teacher.shapes,
            position_weights: None,
        };
        let last = teacher.deepest.as_str();
        let plain = FitContext::default();
        let (straight, straight_losses) = train_student(&settings, last, &data, &plain, None, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ctx = FitContext { checkpoint_dir: Some(dir.path().to_path_buf()), ..FitContext::default() };
        let stopped = train_student(&settings, last, &data, &ctx, Some(5), None).unwrap_err();
        assert!(matches!(stopped, VigilError::Interrupted(_)), "{stopped}");
        let (resumed, resumed_losses) = train_student(&settings, last, &data, &ctx, None, None).unwrap();
        assert_eq!(resumed, straight);
        assert_eq!(resumed_losses, straight_losses);
        // Another seed trains another student; other settings refuse the checkpoint.
        let other_seed = FitContext { seed: 1, ..FitContext::default() };
        assert_ne!(train_student(&settings, last, &data, &other_seed, None, None).unwrap().0, straight);
        let other = StfpmSettings { epochs: 4, ..settings.clone() };
        let error = train_student(&other, last, &data, &ctx, None, None).unwrap_err().to_string();
        assert!(error.contains(CHECKPOINT_FILE) && error.contains("delete it"), "{error}");
        // Mismatched features are refused.
        let short = TrainingData { targets: &targets[..9], ..data };
        assert!(train_student(&settings, last, &short, &plain, None, None).is_err());
    }

    /// Position weights scale each position's share of the loss: all ones is the plain loss,
    /// zeros leave positions out.
    #[test]
    fn position_weights_leave_positions_out_of_the_loss() {
        let settings = StfpmSettings { epochs: 1, ..small_settings() };
        let (pixels, targets, teacher) = training_data(&settings, 4);
        let last = teacher.deepest.as_str();
        let ctx = FitContext::default();
        let weights = |keep: fn(usize, usize) -> bool| -> PerLayer {
            (0..4)
                .map(|_| {
                    teacher
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
                images: &pixels,
                targets: &targets,
                shapes: &teacher.shapes,
                position_weights: w,
            };
            train_student(&settings, last, &data, &ctx, None, None).unwrap()
        };
        let (plain_state, plain) = train(None);
        let ones = weights(|_, _| true);
        let (ones_state, with_ones) = train(Some(&ones));
        assert_eq!((ones_state, with_ones), (plain_state, plain.clone()));
        let top_half = weights(|i, side| i < side * side / 2);
        let (_, halved) = train(Some(&top_half));
        assert!(halved[0] < 0.8 * plain[0] && halved[0] > 0.2 * plain[0], "{halved:?} vs {plain:?}");
    }

    #[test]
    fn normalization_matches_its_definition() {
        // Two positions, three channels: (3, 0, 4) and the zero vector.
        let values = [3.0, 0.0, 0.0, 0.0, 4.0, 0.0];
        assert_eq!(normalized(&values, 3), vec![0.6, 0.0, 0.0, 0.0, 0.8, 0.0]);
        let device = Device::flex();
        let x = Tensor::<4>::from_data(TensorData::new(values.to_vec(), [1, 3, 1, 2]), &device);
        assert_eq!(tensor_to_vec(normalize_channels(x)), vec![0.6, 0.0, 0.0, 0.0, 0.8, 0.0]);
    }

    #[test]
    fn bad_settings_states_and_masks_are_refused() {
        let zero = serde_json::json!({ "batch_size": 0 });
        assert!(StfpmDetector::load(&zero, &TensorBag::new()).is_err());
        let odd = StfpmSettings { input_size: 66, ..small_settings() };
        let error = Teacher::open(&odd).err().unwrap().to_string();
        assert!(error.contains("stride"), "{error}");
        let settings = StfpmSettings { epochs: 1, ..small_settings() };
        let mut detector = StfpmDetector::new(settings.clone()).unwrap();
        detector.fit(&InMemorySource::new(vec![texture(0, None); 2]), &FitContext::default()).unwrap();
        let error = detector.score(&texture(1, None), Some(&Mask::empty(8, 8))).unwrap_err().to_string();
        assert!(error.contains("ignore mask"), "{error}");
        // A state missing a tensor, or one for another backbone, does not load.
        let mut state = detector.state().unwrap();
        let json = detector.settings();
        let mut holed = TensorBag::new();
        for name in state.names().filter(|n| !n.starts_with("features.5.")) {
            holed.put_f32(name, state.shape(name).unwrap(), state.f32(name, None).unwrap());
        }
        let error = StfpmDetector::load(&json, &holed).err().unwrap().to_string();
        assert!(error.contains("features.5."), "{error}");
        state.put_f32("features.14.conv.0.0.weight", &[1], vec![0.0]);
        assert!(StfpmDetector::load(&json, &state).is_err());
    }
}
