//! Maximum-likelihood training of a flow on frozen features, resumable and exactly repeatable:
//! what U-Flow and FastFlow share. A method says what differs ([`FlowFit`]: its settings record,
//! batch size, epochs, learning-rate schedule, the weight of the ½‖z‖² term) and how to build and
//! rebuild its model; the batches, the checks, the checkpoints and the loss bookkeeping are here.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use vigil_core::{
    for_each_batch, DataFingerprint, FitContext, Image, ImageSource, Result, TensorBag, VigilError,
};
use vigil_nn::train::{epoch_order, run_training, LoopConfig, TrainTask};
use vigil_nn::{
    optimizer_bytes, restore_optimizer, stable_param_ids, training_device, Checkpoint, OptimizerSettings,
};

use crate::{kept_positions, nll_loss};

/// A flow model trained by maximum likelihood on per-scale features.
pub trait TrainableFlow: Module + Sized {
    /// Latents per scale and log|det J| per sample of features (one [B, C, H, W] per scale); with
    /// `weights` (one [B, 1, H, W] per scale) each position's share counts times its weight.
    fn forward(&self, features: Vec<Tensor<4>>, weights: Option<&[Tensor<4>]>)
        -> (Vec<Tensor<4>>, Tensor<1>);
    /// The learned state, under the method's tensor names.
    fn save(&self, bag: &mut TensorBag);
}

/// Training features: `values[i][scale]` channel-major, shapes (channels, side) per scale, and
/// optionally per image and scale the weight of each position in the loss (0 where the ignore
/// mask touches the position's cell, 1 elsewhere).
pub struct TrainingFeatures<'a> {
    pub values: &'a [Vec<Vec<f32>>],
    pub shapes: &'a [(usize, usize)],
    pub position_weights: Option<&'a [Vec<Vec<f32>>]>,
}

impl TrainingFeatures<'_> {
    fn check(&self, method: &str) -> Result<()> {
        let shapes = self.shapes;
        if self.values.is_empty() {
            return Err(VigilError::invalid(format!("{method}: no training images")));
        }
        // `per_position`: the channels each position holds (1 for the position weights).
        let matches = |v: &[Vec<f32>], per_position: usize| {
            v.len() == shapes.len()
                && v.iter().zip(shapes).all(|(d, (c, s))| d.len() == (*c).min(per_position) * s * s)
        };
        if let Some(i) = self.values.iter().position(|image| !matches(image, usize::MAX)) {
            return Err(VigilError::invalid(format!(
                "{method}: features of training image {i} do not match the scales"
            )));
        }
        if let Some(weights) = self.position_weights {
            if weights.len() != self.values.len() || !weights.iter().all(|w| matches(w, 1)) {
                return Err(VigilError::invalid(format!(
                    "{method}: position weights do not match the training features"
                )));
            }
        }
        Ok(())
    }

    /// Per scale, the positions the ignore masks leave out of the loss over all images.
    fn left_out_positions(&self) -> Option<Vec<usize>> {
        self.position_weights.map(|weights| {
            (0..self.shapes.len())
                .map(|l| weights.iter().map(|w| w[l].iter().filter(|&&v| v == 0.0).count()).sum())
                .collect()
        })
    }
}

/// Extracts the training features of every image of `train`, `chunk` images per `extract` call
/// (which returns per image one channel-major vector per scale), and the position weights of the
/// images' ignore masks on the feature grids of `shapes` (`None` when no image has a mask).
#[allow(clippy::type_complexity)]
pub fn extract_training_features(
    method: &str,
    train: &dyn ImageSource,
    chunk: usize,
    shapes: &[(usize, usize)],
    mut extract: impl FnMut(&[Image]) -> Result<Vec<Vec<Vec<f32>>>>,
) -> Result<(Vec<Vec<Vec<f32>>>, Option<Vec<Vec<Vec<f32>>>>)> {
    let mut extracted = Vec::with_capacity(train.len());
    let mut masks = Vec::with_capacity(train.len());
    for_each_batch(train, chunk, None, |start, images| {
        for (i, image) in (start..).zip(&images) {
            let mask = train.ignore_mask(i);
            if let Some(m) = &mask {
                if (m.width, m.height) != (image.width, image.height) {
                    return Err(VigilError::invalid(format!(
                        "{method}: training image {i} is {}x{} but its ignore mask is {}x{}",
                        image.width, image.height, m.width, m.height
                    )));
                }
            }
            masks.push(mask);
        }
        extracted.extend(extract(&images)?);
        Ok(())
    })?;
    let position_weights = masks.iter().any(Option::is_some).then(|| {
        masks
            .iter()
            .map(|mask| {
                shapes
                    .iter()
                    .map(|&(_, side)| match mask {
                        Some(m) => kept_positions(m, side),
                        None => vec![1.0; side * side],
                    })
                    .collect()
            })
            .collect()
    });
    Ok((extracted, position_weights))
}

/// What a flow method's fit sets.
pub struct FlowFit<'a> {
    /// The method's name: error messages, the progress label and the checkpoint file
    /// `<method>-train.ckpt` inside `FitContext::checkpoint_dir`.
    pub method: &'static str,
    /// The settings a checkpoint must have been written with to be resumed.
    pub settings: serde_json::Value,
    pub epochs: usize,
    pub batch_size: usize,
    pub checkpoint_every: usize,
    /// Adam's L2 weight decay.
    pub weight_decay: f32,
    /// The learning rate of step `step` of `total_steps`.
    pub learning_rate: &'a dyn Fn(usize, usize) -> f64,
    /// The weight of the ½‖z‖² term of the loss for a batch of this many images.
    pub z_weight: &'a dyn Fn(usize) -> f32,
}

/// What a flow method may set beyond [`FlowFit`]: Adam's constants, global gradient-norm
/// clipping and a constant factor on the loss. [`train_flow`] uses the defaults (PyTorch's Adam
/// constants, no clipping, factor 1).
#[derive(Clone, Debug, PartialEq)]
pub struct FlowOptions {
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    /// Before each step, scale all gradients together so their joint L2 norm is at most this
    /// (PyTorch `clip_grad_norm_`, Lightning's `gradient_clip_val`).
    pub max_grad_norm: Option<f32>,
    /// The loss of a batch is [`nll_loss`] times this (CS-Flow divides by the latent dimensions).
    pub loss_factor: f32,
}

impl Default for FlowOptions {
    fn default() -> Self {
        let adam = OptimizerSettings::default();
        FlowOptions {
            beta1: adam.beta1,
            beta2: adam.beta2,
            epsilon: adam.epsilon,
            max_grad_norm: None,
            loss_factor: 1.0,
        }
    }
}

/// The squared L2 norm of every gradient of `module`'s float parameters in `grads`.
struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    sum: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.get::<D>(param.id) {
            let squares = grad.square().sum();
            self.sum = Some(match self.sum.take() {
                None => squares,
                Some(sum) => sum.add(squares),
            });
        }
    }
}

/// The parameter ids of `module`'s float parameters, in visiting order.
struct FloatIds(Vec<(ParamId, usize)>);

impl ModuleVisitor for FloatIds {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push((param.id, D));
    }
}

fn scale_gradient<const D: usize>(grads: &mut GradientsParams, id: ParamId, factor: f32) {
    if let Some(grad) = grads.remove::<D>(id) {
        grads.register(id, grad.mul_scalar(factor));
    }
}

/// Clips the gradients of `module` in place as PyTorch's `clip_grad_norm_(params, max_norm)`:
/// with `n` the L2 norm of all gradients together, each is multiplied by
/// min(1, max_norm / (n + 1e-6)). Returns `n`.
pub fn clip_grad_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f32) -> f32 {
    let mut norm = SquaredNorm { grads, sum: None };
    module.visit(&mut norm);
    let Some(sum) = norm.sum else { return 0.0 };
    let total = sum.into_scalar::<f32>().sqrt();
    let factor = max_norm / (total + 1e-6);
    if factor < 1.0 {
        let mut ids = FloatIds(Vec::new());
        module.visit(&mut ids);
        for (id, rank) in ids.0 {
            match rank {
                1 => scale_gradient::<1>(grads, id, factor),
                2 => scale_gradient::<2>(grads, id, factor),
                3 => scale_gradient::<3>(grads, id, factor),
                4 => scale_gradient::<4>(grads, id, factor),
                5 => scale_gradient::<5>(grads, id, factor),
                6 => scale_gradient::<6>(grads, id, factor),
                other => unreachable!("no flow parameter has rank {other}"),
            }
        }
    }
    total
}

/// A finished flow fit.
pub struct FlowFitResult {
    /// The learned state ([`TrainableFlow::save`]).
    pub state: TensorBag,
    /// The loss of every optimiser step.
    pub step_losses: Vec<f32>,
    pub batches_per_epoch: usize,
}

impl FlowFitResult {
    /// The mean loss of each epoch: the batch losses weighted by batch size, divided by the
    /// number of images times `units_per_image` (1 for a loss per image, the latent dimensions
    /// for a loss per dimension).
    pub fn epoch_losses(&self, batch_size: usize, images: usize, units_per_image: usize) -> Vec<f32> {
        self.step_losses
            .chunks(self.batches_per_epoch)
            .map(|epoch| {
                let total: f32 = epoch
                    .iter()
                    .enumerate()
                    .map(|(b, loss)| loss * batch_size.min(images - b * batch_size) as f32)
                    .sum();
                total / (images * units_per_image) as f32
            })
            .collect()
    }
}

/// Trains a flow on `data` by maximum likelihood with Adam. `new` builds the initial model (from
/// `ctx.seed`), `load` rebuilds one from a checkpoint's state. With a checkpoint folder in `ctx`,
/// the state is written every `checkpoint_every` steps and a later call with the same folder
/// resumes from it exactly; with `session_limit`, the session stops (after writing a checkpoint)
/// once that many steps are done in total, returning [`VigilError::Interrupted`]. `training_set`
/// is recorded in the checkpoint so that a resume on other images is refused.
pub fn train_flow<M: TrainableFlow>(
    fit: &FlowFit,
    data: &TrainingFeatures,
    ctx: &FitContext,
    session_limit: Option<usize>,
    training_set: Option<DataFingerprint>,
    new: impl FnOnce(&Device) -> Result<M>,
    load: impl FnOnce(&TensorBag, &Device) -> Result<M>,
) -> Result<FlowFitResult> {
    train_flow_with(fit, &FlowOptions::default(), data, ctx, session_limit, training_set, new, load)
}

/// [`train_flow`] with other Adam constants, gradient clipping or a loss factor.
#[allow(clippy::too_many_arguments)]
pub fn train_flow_with<M: TrainableFlow>(
    fit: &FlowFit,
    options: &FlowOptions,
    data: &TrainingFeatures,
    ctx: &FitContext,
    session_limit: Option<usize>,
    training_set: Option<DataFingerprint>,
    new: impl FnOnce(&Device) -> Result<M>,
    load: impl FnOnce(&TensorBag, &Device) -> Result<M>,
) -> Result<FlowFitResult> {
    data.check(fit.method)?;
    let checkpoint_path = ctx.checkpoint_dir.as_ref().map(|d| d.join(format!("{}-train.ckpt", fit.method)));
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
    let run = serde_json::json!({
        "settings": fit.settings,
        "images": data.values.len(),
        "shapes": data.shapes,
        "left_out_positions": data.left_out_positions(),
    });
    let device = training_device();
    let mut optimizer = OptimizerSettings {
        weight_decay: fit.weight_decay,
        beta1: options.beta1,
        beta2: options.beta2,
        epsilon: options.epsilon,
        ..Default::default()
    }
    .build();
    let model = match (&resume, &checkpoint_path) {
        (Some(ck), Some(path)) => {
            if ck.meta.get("run") != Some(&run) || ck.seed != ctx.seed {
                return Err(VigilError::file(
                    path,
                    "was written by a run with other settings, data or seed; delete it to start over",
                ));
            }
            let model = load(&ck.weights, &device).map_err(|e| VigilError::file(path, e.to_string()))?;
            let bytes =
                ck.optimizers.first().ok_or_else(|| VigilError::file(path, "holds no optimiser state"))?;
            optimizer = restore_optimizer(optimizer, bytes)?;
            model
        }
        _ => new(&device)?,
    };
    let batches_per_epoch = data.values.len().div_ceil(fit.batch_size);
    let total_steps = fit.epochs * batches_per_epoch;
    let mut task = FlowTask {
        model: Some(stable_param_ids(model)),
        optimizer,
        fit,
        options,
        data,
        seed: ctx.seed,
        run,
        batches_per_epoch,
        total_steps,
        order: None,
        device,
    };
    let mut config = LoopConfig::new(total_steps, fit.method);
    config.checkpoint_every = if checkpoint_path.is_some() { fit.checkpoint_every } else { 0 };
    config.checkpoint_path = checkpoint_path;
    config.session_limit = session_limit;
    config.show_progress = ctx.show_progress;
    config.data = training_set;
    let outcome = run_training(&mut task, &config, resume.as_ref())?;
    if !outcome.finished {
        return Err(VigilError::Interrupted(format!(
            "{} training stopped after step {} of {total_steps}; fit again with the same checkpoint folder \
             to resume",
            fit.method, outcome.steps_done
        )));
    }
    let mut state = TensorBag::new();
    task.model.as_ref().expect("model present after training").save(&mut state);
    Ok(FlowFitResult { state, step_losses: outcome.state.losses, batches_per_epoch })
}

/// One [B, C, side, side] tensor of scale `scale` of the batch `images`.
pub fn batch_tensor(
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

/// One optimiser step at a time, for the resumable training loop.
struct FlowTask<'a, M> {
    model: Option<M>,
    optimizer: ModuleOptimizer,
    fit: &'a FlowFit<'a>,
    options: &'a FlowOptions,
    data: &'a TrainingFeatures<'a>,
    seed: u64,
    run: serde_json::Value,
    batches_per_epoch: usize,
    total_steps: usize,
    /// The current epoch and its image order.
    order: Option<(usize, Vec<usize>)>,
    device: Device,
}

impl<M: TrainableFlow> TrainTask for FlowTask<'_, M> {
    fn step(&mut self, step: usize) -> Result<f32> {
        let epoch = step / self.batches_per_epoch;
        let images = self.data.values;
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.order = Some((epoch, epoch_order(self.seed, epoch, images.len())));
        }
        let (_, order) = self.order.as_ref().expect("order set above");
        let size = self.fit.batch_size;
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
        let mut loss = nll_loss(&latents, log_det, weights.as_deref(), (self.fit.z_weight)(members.len()));
        if self.options.loss_factor != 1.0 {
            loss = loss.mul_scalar(self.options.loss_factor);
        }
        let value = loss.clone().into_scalar::<f32>();
        if !value.is_finite() {
            return Err(VigilError::Model(format!(
                "{}: training loss became {value} at step {step}",
                self.fit.method
            )));
        }
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        if let Some(max_norm) = self.options.max_grad_norm {
            clip_grad_norm(&model, &mut grads, max_norm);
        }
        let learning_rate = (self.fit.learning_rate)(step, self.total_steps);
        self.model = Some(self.optimizer.step(learning_rate, model, grads));
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

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::step::tests::random;
    use crate::FlowStep;

    fn gradients(step: &FlowStep) -> GradientsParams {
        let x = random([2, 4, 3, 3], 1).to_device(&training_device());
        let (y, log_det) = step.forward(x);
        let loss = y.square().sum().add(log_det.sum());
        GradientsParams::from_grads(loss.backward(), step)
    }

    fn norm(step: &FlowStep, grads: &mut GradientsParams) -> f32 {
        clip_grad_norm(step, grads, f32::MAX)
    }

    #[test]
    fn gradients_are_clipped_together_to_the_norm() {
        let device = training_device();
        let step = stable_param_ids(FlowStep::new(4, 3, &mut ChaCha8Rng::seed_from_u64(3), &device).unwrap());
        let mut grads = gradients(&step);
        let total = norm(&step, &mut grads);
        assert!(total > 1.0, "{total}");
        // Above the norm: nothing changes.
        let before = grads.get::<4>(step_param_id(&step)).unwrap().into_data();
        assert_eq!(clip_grad_norm(&step, &mut grads, 2.0 * total), total);
        assert_eq!(grads.get::<4>(step_param_id(&step)).unwrap().into_data(), before);
        // Below: every gradient shrinks by the same factor, to the joint norm asked for.
        clip_grad_norm(&step, &mut grads, total / 4.0);
        let after = norm(&step, &mut grads);
        assert!((after - total / 4.0).abs() < 1e-4 * total, "{after} vs {}", total / 4.0);
        let shrunk = grads.get::<4>(step_param_id(&step)).unwrap().into_data().try_to_vec::<f32>().unwrap();
        for (a, b) in shrunk.iter().zip(before.try_to_vec::<f32>().unwrap()) {
            assert!((a * 4.0 - b).abs() <= 1e-4 * b.abs().max(1e-3), "{a} vs {b} / 4");
        }
    }

    /// The id of the step's first convolution weight.
    fn step_param_id(step: &FlowStep) -> ParamId {
        struct First(Option<ParamId>);
        impl ModuleVisitor for First {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if D == 4 && self.0.is_none() {
                    self.0 = Some(param.id);
                }
            }
        }
        let mut first = First(None);
        step.visit(&mut first);
        first.0.unwrap()
    }
}
