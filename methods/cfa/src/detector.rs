//! CFA as a vigil [`Detector`]: frozen backbone features turned into target-oriented patch
//! descriptors by a trainable CoordConv 1×1, pulled within a small hypersphere around their
//! nearest normal centroids and pushed away from the next ones; the map is the soft-min-weighted
//! distance to the nearest centroids.

use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use vigil_backbones::Backbone;
use vigil_core::{
    for_each_batch, BlurBorder, ChannelMode, DataFingerprint, Detector, FitContext, Image, ImageSource, Map,
    Mask, Result, ScoreOutput, TensorBag, VigilError,
};
use vigil_nn::train::{epoch_order, run_training, LoopConfig, TrainTask};
use vigil_nn::{
    default_device, optimizer_bytes, restore_optimizer, stable_param_ids, tensor_from_vec, tensor_to_vec,
    training_device, Checkpoint, OptimizerSettings,
};

use crate::model::{
    cfa_loss, descriptor_input, initialize_memory_bank, position_scores, squared_distances, Descriptor,
    DescriptorInput, MemoryBank,
};
use crate::settings::{CfaSettings, CfaSpec};

/// The checkpoint's file name inside `FitContext::checkpoint_dir`.
const CHECKPOINT_FILE: &str = "cfa-train.ckpt";
/// Images per backbone call while extracting the training features.
const EXTRACT_CHUNK: usize = 8;

/// The frozen feature side of the model.
struct Features {
    backbone: Backbone,
    /// Descriptor input channels (stacked features + 2 coordinates) and the grid side.
    inputs: usize,
    side: usize,
}

impl Features {
    fn new(settings: &CfaSettings) -> Result<Self> {
        let backbone =
            Backbone::open(settings.backbone, settings.weights.as_deref(), settings.random_weights_seed)?;
        let mut channels = 0;
        let mut side = 0;
        for (i, layer) in settings.layers.iter().enumerate() {
            let (c, stride) = backbone.layer_info(layer)?;
            if !settings.input_size.is_multiple_of(stride) {
                return Err(VigilError::Config(format!(
                    "cfa: input size {} is not a multiple of layer {layer}'s stride {stride}",
                    settings.input_size
                )));
            }
            if i == 0 {
                side = settings.input_size / stride;
            }
            channels += c;
        }
        if channels < settings.gamma_d {
            return Err(VigilError::Config(format!(
                "cfa: gamma_d {} exceeds the {channels} feature channels",
                settings.gamma_d
            )));
        }
        Ok(Features { backbone, inputs: channels + 2, side })
    }

    fn outputs(&self, settings: &CfaSettings) -> usize {
        (self.inputs - 2) / settings.gamma_d
    }

    fn extract(&self, images: &[Image], settings: &CfaSettings) -> Result<Vec<DescriptorInput>> {
        let size = (settings.input_size, settings.input_size);
        let maps = self.backbone.extract(images, &settings.layers, size)?;
        maps.iter().map(|layers| descriptor_input(layers)).collect()
    }
}

fn batch_tensor(inputs: &[&DescriptorInput], device: &Device) -> Tensor<3> {
    let first = inputs[0];
    let positions = first.height * first.width;
    let data: Vec<f32> = inputs.iter().flat_map(|i| i.data.iter().copied()).collect();
    tensor_from_vec(data, [inputs.len(), positions, first.channels], device)
}

/// CFA: [`Detector`] with method name "cfa".
pub struct CfaDetector {
    settings: CfaSettings,
    features: Option<Features>,
    descriptor: Option<Descriptor>,
    bank: Option<MemoryBank>,
    /// Mean training loss of each epoch of the last fit.
    pub loss_history: Vec<f32>,
}

impl CfaDetector {
    pub fn new(settings: CfaSettings) -> Result<Self> {
        settings.validate()?;
        Ok(CfaDetector { settings, features: None, descriptor: None, bank: None, loss_history: Vec::new() })
    }

    /// Rebuilds a fitted model from [`Detector::settings`] and [`Detector::state`].
    pub fn load(settings: &serde_json::Value, state: &TensorBag) -> Result<Self> {
        let settings: CfaSettings = serde_json::from_value(settings.clone())
            .map_err(|e| VigilError::Model(format!("cfa settings: {e}")))?;
        settings.validate()?;
        let features = Features::new(&settings)?;
        let outputs = features.outputs(&settings);
        let descriptor = Descriptor::load(state, features.inputs, outputs, &default_device())?;
        let bank = MemoryBank::load(state, outputs, features.side * features.side)?;
        Ok(CfaDetector {
            settings,
            features: Some(features),
            descriptor: Some(descriptor),
            bank: Some(bank),
            loss_history: Vec::new(),
        })
    }

    pub fn settings_struct(&self) -> &CfaSettings {
        &self.settings
    }

    fn fitted(&self) -> Result<(&Features, &Descriptor, &MemoryBank)> {
        match (&self.features, &self.descriptor, &self.bank) {
            (Some(f), Some(d), Some(b)) => Ok((f, d, b)),
            _ => Err(VigilError::Model("cfa: score called before fit or load".into())),
        }
    }
}

/// Training data: the descriptor inputs of every training image and, when ignore masks are
/// given, per image the grid positions they leave in the loss.
pub struct TrainingInputs<'a> {
    pub inputs: &'a [DescriptorInput],
    pub kept: Option<&'a [Vec<bool>]>,
}

/// Initialises the memory bank from the descriptor at its seeded start and trains the
/// descriptor (AdamW with AMSGrad). Returns the inference-side descriptor, the bank and the mean
/// loss of each epoch. With a checkpoint folder in `ctx`, the state is written every
/// `checkpoint_every` steps and a later call with the same folder resumes from it exactly; with
/// `session_limit`, the session stops (after writing a checkpoint) once that many steps are done
/// in total, returning [`VigilError::Interrupted`]. `training_set` is recorded in the checkpoint
/// so that a resume on other images is refused.
pub fn train_cfa(
    settings: &CfaSettings,
    data: &TrainingInputs,
    ctx: &FitContext,
    session_limit: Option<usize>,
    training_set: Option<DataFingerprint>,
) -> Result<(Descriptor, MemoryBank, Vec<f32>)> {
    settings.validate()?;
    let inputs = data.inputs;
    let first = inputs.first().ok_or_else(|| VigilError::invalid("cfa: no training images"))?;
    let positions = first.height * first.width;
    if let Some(i) = inputs
        .iter()
        .position(|x| (x.height, x.width, x.channels) != (first.height, first.width, first.channels))
    {
        return Err(VigilError::invalid(format!(
            "cfa: descriptor input of training image {i} differs in shape"
        )));
    }
    if let Some(kept) = data.kept {
        if kept.len() != inputs.len() || kept.iter().any(|k| k.len() != positions) {
            return Err(VigilError::invalid("cfa: kept positions do not match the training inputs"));
        }
        if !kept.iter().flatten().any(|&k| k) {
            return Err(VigilError::invalid("cfa: the ignore masks cover every training position"));
        }
    }
    if settings.neighbors + settings.hard_negatives > positions {
        return Err(VigilError::Config(format!(
            "cfa: neighbors + hard_negatives ({}) exceed the memory bank's {positions} centroids",
            settings.neighbors + settings.hard_negatives
        )));
    }
    let outputs = (first.channels - 2) / settings.gamma_d;
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
    let left_out: Option<usize> = data.kept.map(|kept| kept.iter().flatten().filter(|&&k| !k).count());
    let run = serde_json::json!({
        "settings": CfaSpec::complete(settings),
        "images": inputs.len(),
        "grid": [first.height, first.width, first.channels],
        "left_out_positions": left_out,
    });
    let device = training_device();
    // The bank comes from the descriptor's seeded start, batch after batch in the data's order
    // (anomalib: in its loader's order), before any training step; a resumed run rebuilds it.
    let start = Descriptor::new(first.channels, outputs, ctx.seed, &default_device());
    let batches: Vec<Tensor<3>> = inputs
        .chunks(settings.batch_size)
        .map(|chunk| batch_tensor(&chunk.iter().collect::<Vec<_>>(), &default_device()))
        .collect();
    let bank = initialize_memory_bank(&start, &batches);
    drop(batches);
    let mut optimizer = optimizer(settings);
    let descriptor = match (&resume, &checkpoint_path) {
        (Some(ck), Some(path)) => {
            if ck.meta.get("run") != Some(&run) || ck.seed != ctx.seed {
                return Err(VigilError::file(
                    path,
                    "was written by a run with other settings, data or seed; delete it to start over",
                ));
            }
            let bytes =
                ck.optimizers.first().ok_or_else(|| VigilError::file(path, "holds no optimiser state"))?;
            optimizer = restore_optimizer(optimizer, bytes)?;
            Descriptor::load(&ck.weights, first.channels, outputs, &device)
                .map_err(|e| VigilError::file(path, e.to_string()))?
        }
        _ => Descriptor::new(first.channels, outputs, ctx.seed, &device),
    };
    let batches_per_epoch = inputs.len().div_ceil(settings.batch_size);
    let total_steps = settings.epochs * batches_per_epoch;
    let mut task = CfaTask {
        descriptor: Some(stable_param_ids(descriptor)),
        bank: bank.tensor(&device),
        optimizer,
        settings,
        data,
        seed: ctx.seed,
        run,
        batches_per_epoch,
        order: None,
        device,
    };
    let mut config = LoopConfig::new(total_steps, "cfa");
    config.checkpoint_every = if checkpoint_path.is_some() { settings.checkpoint_every } else { 0 };
    config.checkpoint_path = checkpoint_path;
    config.session_limit = session_limit;
    config.show_progress = ctx.show_progress;
    config.data = training_set;
    let outcome = run_training(&mut task, &config, resume.as_ref())?;
    if !outcome.finished {
        return Err(VigilError::Interrupted(format!(
            "cfa training stopped after step {} of {total_steps}; fit again with the same checkpoint folder to resume",
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
                    loss * settings.batch_size.min(inputs.len() - b * settings.batch_size) as f32
                })
                .sum();
            total / inputs.len() as f32
        })
        .collect();
    // Inference runs without the autodiff graph: rebuild the descriptor from its learned state.
    let mut state = TensorBag::new();
    task.descriptor.as_ref().expect("descriptor present after training").save(&mut state);
    let descriptor = Descriptor::load(&state, first.channels, outputs, &default_device())?;
    Ok((descriptor, bank, losses))
}

/// anomalib's `configure_optimizers`: AdamW (PyTorch constants) with AMSGrad.
fn optimizer(settings: &CfaSettings) -> ModuleOptimizer {
    OptimizerSettings {
        decoupled: true,
        weight_decay: settings.weight_decay as f32,
        amsgrad: true,
        ..Default::default()
    }
    .build()
}

/// One CFA optimiser step at a time, for the resumable training loop.
struct CfaTask<'a> {
    descriptor: Option<Descriptor>,
    bank: Tensor<2>,
    optimizer: ModuleOptimizer,
    settings: &'a CfaSettings,
    data: &'a TrainingInputs<'a>,
    seed: u64,
    run: serde_json::Value,
    batches_per_epoch: usize,
    /// The current epoch and its image order.
    order: Option<(usize, Vec<usize>)>,
    device: Device,
}

impl TrainTask for CfaTask<'_> {
    fn step(&mut self, step: usize) -> Result<f32> {
        let epoch = step / self.batches_per_epoch;
        let inputs = self.data.inputs;
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.order = Some((epoch, epoch_order(self.seed, epoch, inputs.len())));
        }
        let (_, order) = self.order.as_ref().expect("order set above");
        let size = self.settings.batch_size;
        let first = (step % self.batches_per_epoch) * size;
        let members = &order[first..(first + size).min(order.len())];
        let batch: Vec<&DescriptorInput> = members.iter().map(|&i| &inputs[i]).collect();
        let positions = batch[0].height * batch[0].width;
        let kept: Vec<f32> = match self.data.kept {
            Some(all) => {
                members.iter().flat_map(|&i| all[i].iter().map(|&k| f32::from(u8::from(k)))).collect()
            }
            None => vec![1.0; members.len() * positions],
        };
        let kept = tensor_from_vec(kept, [members.len(), positions, 1], &self.device);
        let descriptor = self.descriptor.take().expect("descriptor present between steps");
        let features = descriptor.forward(batch_tensor(&batch, &self.device));
        let distances = squared_distances(features, self.bank.clone());
        let s = self.settings;
        let loss = cfa_loss(distances, kept, s.neighbors, s.hard_negatives, s.radius as f32);
        let value = loss.clone().into_scalar::<f32>();
        if !value.is_finite() {
            return Err(VigilError::Model(format!("cfa: training loss became {value} at step {step}")));
        }
        let grads = GradientsParams::from_grads(loss.backward(), &descriptor);
        self.descriptor = Some(self.optimizer.step(s.learning_rate, descriptor, grads));
        Ok(value)
    }

    fn snapshot(&self) -> Result<Checkpoint> {
        let mut weights = TensorBag::new();
        self.descriptor.as_ref().expect("descriptor present between steps").save(&mut weights);
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

impl Detector for CfaDetector {
    fn method(&self) -> &'static str {
        "cfa"
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
            return Err(VigilError::invalid("cfa: no training images"));
        }
        let features = Features::new(&self.settings)?;
        let side = features.side;
        let mut inputs = Vec::with_capacity(train.len());
        let mut kept: Vec<Option<Vec<bool>>> = Vec::with_capacity(train.len());
        for_each_batch(train, EXTRACT_CHUNK, None, |start, images| {
            for (i, image) in (start..).zip(&images) {
                let mask = train.ignore_mask(i);
                if let Some(m) = &mask {
                    if (m.width, m.height) != (image.width, image.height) {
                        return Err(VigilError::invalid(format!(
                            "cfa: training image {i} is {}x{} but its ignore mask is {}x{}",
                            image.width, image.height, m.width, m.height
                        )));
                    }
                }
                kept.push(mask.map(|m| m.kept_cells(side, side)));
            }
            inputs.extend(features.extract(&images, &self.settings)?);
            Ok(())
        })?;
        // Ignored grid positions are left out of the loss (the memory bank is still the mean of
        // every position, as the masks change only which features are pulled and pushed).
        let kept: Option<Vec<Vec<bool>>> = kept
            .iter()
            .any(Option::is_some)
            .then(|| kept.into_iter().map(|k| k.unwrap_or_else(|| vec![true; side * side])).collect());
        let data = TrainingInputs { inputs: &inputs, kept: kept.as_deref() };
        let training_set = ctx.checkpoint_dir.as_ref().map(|_| train.fingerprint()).transpose()?;
        let (descriptor, bank, losses) = train_cfa(&self.settings, &data, ctx, None, training_set)?;
        self.loss_history = losses;
        self.descriptor = Some(descriptor);
        self.bank = Some(bank);
        self.features = Some(features);
        Ok(())
    }

    fn score(&self, image: &Image, ignore: Option<&Mask>) -> Result<ScoreOutput> {
        if let Some(mask) = ignore {
            mask.check_fits(image, "cfa")?;
        }
        let (features, descriptor, bank) = self.fitted()?;
        let input = features.extract(std::slice::from_ref(image), &self.settings)?.remove(0);
        let device = default_device();
        let target = descriptor.forward(batch_tensor(&[&input], &device));
        let squared = tensor_to_vec(squared_distances(target, bank.tensor(&device)));
        let grid =
            position_scores(&squared, bank.centroids, self.settings.neighbors, input.width, input.height);
        // anomalib's AnomalyMapGenerator: bilinear to the input size, Gaussian blur σ = 4 with
        // reflected borders; score = the map's maximum (over the kept pixels with an ignore mask).
        let size = self.settings.input_size;
        let map =
            grid.resize_bilinear(size, size).gaussian_blur_with(self.settings.sigma, BlurBorder::WholeSample);
        map.check_finite("cfa")?;
        let image_score = match ignore {
            None => map.max(),
            Some(mask) => {
                let kept = mask.kept_cells(size, size);
                map.data.iter().zip(&kept).filter(|(_, &k)| k).map(|(&v, _)| v).fold(0.0, f32::max)
            }
        };
        let map: Map = map.resize_bilinear(image.width, image.height);
        Ok(ScoreOutput { map, image_score: Some(image_score), log10_nfa: None })
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(CfaSpec::complete(&self.settings)).expect("settings serialise")
    }

    fn state(&self) -> Result<TensorBag> {
        let (_, descriptor, bank) = self.fitted()?;
        let mut bag = TensorBag::new();
        descriptor.save(&mut bag);
        bank.save(&mut bag);
        Ok(bag)
    }
}

#[cfg(test)]
mod tests {
    use vigil_core::InMemorySource;

    use super::*;

    fn small_settings() -> CfaSettings {
        CfaSettings {
            random_weights_seed: Some(3),
            input_size: 64,
            epochs: 4,
            batch_size: 4,
            ..CfaSettings::default()
        }
    }

    /// A smooth texture, with a bright square where `defect` says.
    fn texture(seed: u64, defect: Option<(usize, usize, usize)>) -> Image {
        let (w, h) = (64, 64);
        let mut data = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let base = 0.5 + 0.2 * ((x as f32 * 0.4 + seed as f32 * 0.3).sin() * (y as f32 * 0.3).cos());
                let v = match defect {
                    Some((dx, dy, s)) if (dx..dx + s).contains(&x) && (dy..dy + s).contains(&y) => 1.0,
                    _ => base,
                };
                data.extend([v, v * 0.9, v * 0.8]);
            }
        }
        Image::new(w, h, 3, data).unwrap()
    }

    fn training_inputs(settings: &CfaSettings) -> Vec<DescriptorInput> {
        let features = Features::new(settings).unwrap();
        let images: Vec<Image> = (0..8).map(|i| texture(i, None)).collect();
        features.extract(&images, settings).unwrap()
    }

    #[test]
    fn training_lowers_the_loss_and_is_deterministic() {
        let settings = small_settings();
        let inputs = training_inputs(&settings);
        let data = TrainingInputs { inputs: &inputs, kept: None };
        let ctx = FitContext::default();
        let (_, _, losses) = train_cfa(&settings, &data, &ctx, None, None).unwrap();
        assert_eq!(losses.len(), settings.epochs);
        assert!(losses.last().unwrap() < losses.first().unwrap(), "{losses:?}");
        let (_, _, again) = train_cfa(&settings, &data, &ctx, None, None).unwrap();
        assert_eq!(losses, again);
    }

    #[test]
    fn interrupted_training_resumes_to_the_same_descriptor() {
        let settings = CfaSettings { checkpoint_every: 2, ..small_settings() };
        let inputs = training_inputs(&settings);
        let data = TrainingInputs { inputs: &inputs, kept: None };
        let (plain, _, plain_losses) =
            train_cfa(&settings, &data, &FitContext::default(), None, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ctx = FitContext { checkpoint_dir: Some(dir.path().to_path_buf()), ..FitContext::default() };
        let stopped = train_cfa(&settings, &data, &ctx, Some(3), None).unwrap_err();
        assert!(matches!(stopped, VigilError::Interrupted(_)), "{stopped}");
        let (resumed, _, resumed_losses) = train_cfa(&settings, &data, &ctx, None, None).unwrap();
        let (mut a, mut b) = (TensorBag::new(), TensorBag::new());
        plain.save(&mut a);
        resumed.save(&mut b);
        assert_eq!(a, b);
        assert_eq!(plain_losses, resumed_losses);
        let other = CfaSettings { radius: 0.5, ..settings };
        let error = train_cfa(&other, &data, &ctx, None, None).unwrap_err().to_string();
        assert!(error.contains(CHECKPOINT_FILE) && error.contains("delete it"), "{error}");
    }

    #[test]
    fn fit_then_score_separates_a_defect_and_reloads_the_same() {
        let mut detector = CfaDetector::new(small_settings()).unwrap();
        let train = InMemorySource::new((0..8).map(|i| texture(i, None)).collect());
        detector.fit(&train, &FitContext::default()).unwrap();
        let normal = detector.score(&texture(20, None), None).unwrap();
        let defect = detector.score(&texture(21, Some((24, 24, 12))), None).unwrap();
        assert!(defect.image_score > normal.image_score, "{:?} {:?}", defect.image_score, normal.image_score);
        // The defect's region holds the map's peak.
        let peak = defect.map.data.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        let (x, y) = (peak % 64, peak / 64);
        assert!((18..42).contains(&x) && (18..42).contains(&y), "peak at {x},{y}");
        let loaded = CfaDetector::load(&detector.settings(), &detector.state().unwrap()).unwrap();
        assert_eq!(loaded.score(&texture(21, Some((24, 24, 12))), None).unwrap().map, defect.map);
    }

    #[test]
    fn bad_settings_and_mismatched_masks_are_refused() {
        assert!(CfaDetector::new(CfaSettings { gamma_c: 4, ..small_settings() }).is_err());
        let mut detector = CfaDetector::new(small_settings()).unwrap();
        assert!(detector.score(&texture(1, None), None).is_err(), "scoring before fit");
        let train = InMemorySource { images: vec![texture(1, None)], ignore: Some(Mask::empty(10, 10)) };
        let error = detector.fit(&train, &FitContext::default()).unwrap_err().to_string();
        assert!(error.contains("ignore mask"), "{error}");
    }
}
