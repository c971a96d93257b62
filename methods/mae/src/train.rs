//! MAE pre-training on the normal images, as the official `main_pretrain.py`: random masking
//! (ratio 0.75), the masked per-patch MSE (optionally on normalised pixels), AdamW (betas 0.9 /
//! 0.95, decoupled weight decay), lr = blr · batch / 256 with a linear warm-up and a half-cycle
//! cosine per iteration, random resized crops (scale 0.2–1, ratio 3/4–4/3) and horizontal flips.
//! Resumable bit for bit: batches, crops and masks are pure functions of (seed, step).

use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vigil_core::{DataFingerprint, FitContext, Result, TensorBag, VigilError};
use vigil_nn::train::{epoch_order, run_training, LoopConfig, TrainTask};
use vigil_nn::{
    optimizer_bytes, restore_optimizer, stable_param_ids, tensor_from_vec, training_device, Checkpoint,
    OptimizerSettings,
};

use crate::model::{init_state, masked_loss_weighted, Mae, MaskPlan};
use crate::settings::MaeSettings;

/// The checkpoint's file name inside `FitContext::checkpoint_dir`.
pub const CHECKPOINT_FILE: &str = "mae-train.ckpt";

/// Normalised training images (`[3, side, side]` each) and, per image, the pixels an ignore mask
/// leaves out (`[side, side]`, 1 = ignored), if any.
pub struct TrainingData<'a> {
    pub images: &'a [Vec<f32>],
    pub ignored: Option<&'a [Vec<f32>]>,
}

/// The official schedule: linear warm-up over `warmup_epochs`, then half-cycle cosine to 0,
/// evaluated at the fractional epoch of `step`.
pub fn learning_rate_at(settings: &MaeSettings, step: usize, batches_per_epoch: usize) -> f64 {
    let lr = settings.learning_rate();
    let epoch = step as f64 / batches_per_epoch as f64;
    let warmup = settings.warmup_epochs as f64;
    if epoch < warmup {
        lr * epoch / warmup
    } else {
        let span = (settings.epochs as f64 - warmup).max(1e-9);
        lr * 0.5 * (1.0 + (std::f64::consts::PI * (epoch - warmup) / span).cos())
    }
}

/// A random resized crop + flip of a stack of `channels` planes of `side` × `side`, bilinear
/// back to `side` (torchvision's `RandomResizedCrop.get_params` with ten tries, then the centre
/// crop fallback).
struct Crop {
    x0: f32,
    y0: f32,
    w: f32,
    h: f32,
    flip: bool,
}

impl Crop {
    fn draw(rng: &mut ChaCha8Rng, side: usize) -> Crop {
        let area = (side * side) as f32;
        let (log_lo, log_hi) = ((3f32 / 4.0).ln(), (4f32 / 3.0).ln());
        let mut chosen = None;
        for _ in 0..10 {
            let target = area * rng.gen_range(0.2f32..1.0);
            let ratio = rng.gen_range(log_lo..log_hi).exp();
            let w = (target * ratio).sqrt().round() as usize;
            let h = (target / ratio).sqrt().round() as usize;
            if (1..=side).contains(&w) && (1..=side).contains(&h) {
                let x0 = rng.gen_range(0..=side - w);
                let y0 = rng.gen_range(0..=side - h);
                chosen = Some((x0, y0, w, h));
                break;
            }
        }
        let (x0, y0, w, h) = chosen.unwrap_or((0, 0, side, side));
        Crop { x0: x0 as f32, y0: y0 as f32, w: w as f32, h: h as f32, flip: rng.gen_bool(0.5) }
    }

    /// The crop of `planes` (channel-major), resized to `side` with half-pixel centres.
    fn apply(&self, planes: &[f32], channels: usize, side: usize) -> Vec<f32> {
        let mut out = vec![0f32; channels * side * side];
        let (sx, sy) = (self.w / side as f32, self.h / side as f32);
        let clamp = |v: f32| v.clamp(0.0, (side - 1) as f32);
        for y in 0..side {
            let fy = clamp(self.y0 + (y as f32 + 0.5) * sy - 0.5);
            let (y0, ty) = (fy.floor() as usize, fy - fy.floor());
            let y1 = (y0 + 1).min(side - 1);
            for x in 0..side {
                let xo = if self.flip { side - 1 - x } else { x };
                let fx = clamp(self.x0 + (xo as f32 + 0.5) * sx - 0.5);
                let (x0, tx) = (fx.floor() as usize, fx - fx.floor());
                let x1 = (x0 + 1).min(side - 1);
                for c in 0..channels {
                    let p = &planes[c * side * side..(c + 1) * side * side];
                    let top = p[y0 * side + x0] * (1.0 - tx) + p[y0 * side + x1] * tx;
                    let bottom = p[y1 * side + x0] * (1.0 - tx) + p[y1 * side + x1] * tx;
                    out[(c * side + y) * side + x] = top * (1.0 - ty) + bottom * ty;
                }
            }
        }
        out
    }
}

/// Pre-trains an MAE on `data`. Returns its state (official names) and the mean loss of each
/// epoch. With a checkpoint folder in `ctx` the state is written every `checkpoint_every`
/// steps and a later call resumes from it exactly; with `session_limit` the session stops
/// after that many steps in total with [`VigilError::Interrupted`].
pub fn pretrain(
    settings: &MaeSettings,
    data: &TrainingData,
    ctx: &FitContext,
    session_limit: Option<usize>,
    training_set: Option<DataFingerprint>,
) -> Result<(TensorBag, Vec<f32>)> {
    settings.validate()?;
    let arch = settings.arch();
    let n = data.images.len();
    let side = arch.image_size;
    if n == 0 {
        return Err(VigilError::invalid("mae: no training images"));
    }
    if data.images.iter().any(|x| x.len() != 3 * side * side)
        || data.ignored.is_some_and(|m| m.len() != n || m.iter().any(|p| p.len() != side * side))
    {
        return Err(VigilError::invalid("mae: training images and ignore masks do not match the input size"));
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
    let ignored_pixels: Option<usize> =
        data.ignored.map(|m| m.iter().map(|p| p.iter().filter(|&&v| v > 0.5).count()).sum());
    let run = serde_json::json!({
        "settings": settings.complete(),
        "images": n,
        "ignored_pixels": ignored_pixels,
    });
    let device = training_device();
    let optimizer_settings = OptimizerSettings {
        decoupled: true,
        weight_decay: settings.weight_decay as f32,
        beta1: 0.9,
        beta2: 0.95,
        ..OptimizerSettings::default()
    };
    let mut optimizer = optimizer_settings.build();
    let mut state = init_state(&arch, ctx.seed)?;
    if let (Some(ck), Some(path)) = (&resume, &checkpoint_path) {
        if ck.meta.get("run") != Some(&run) || ck.seed != ctx.seed {
            return Err(VigilError::file(
                path,
                "was written by a run with other settings, data or seed; delete it to start over",
            ));
        }
        state = ck.weights.clone();
        let bytes =
            ck.optimizers.first().ok_or_else(|| VigilError::file(path, "holds no optimiser state"))?;
        optimizer = restore_optimizer(optimizer, bytes)?;
    }
    let mae = Mae::from_state(&arch, &state, "", &device).map_err(|e| match &checkpoint_path {
        Some(path) if resume.is_some() => VigilError::file(path, e.to_string()),
        _ => e,
    })?;
    let batches_per_epoch = n.div_ceil(settings.batch_size);
    let total_steps = settings.epochs * batches_per_epoch;
    let mut task = MaeTask {
        mae: Some(stable_param_ids(mae)),
        optimizer,
        settings,
        data,
        seed: ctx.seed,
        run,
        batches_per_epoch,
        order: None,
        device,
    };
    let mut config = LoopConfig::new(total_steps, "mae");
    config.checkpoint_every = if checkpoint_path.is_some() { settings.checkpoint_every } else { 0 };
    config.checkpoint_path = checkpoint_path;
    config.session_limit = session_limit;
    config.show_progress = ctx.show_progress;
    config.data = training_set;
    let outcome = run_training(&mut task, &config, resume.as_ref())?;
    if !outcome.finished {
        return Err(VigilError::Interrupted(format!(
            "mae training stopped after step {} of {total_steps}; fit again with the same checkpoint folder to resume",
            outcome.steps_done
        )));
    }
    let losses = outcome
        .state
        .losses
        .chunks(batches_per_epoch)
        .map(|epoch| epoch.iter().sum::<f32>() / epoch.len() as f32)
        .collect();
    let state = task.mae.as_ref().expect("network present after training").state();
    Ok((state, losses))
}

struct MaeTask<'a> {
    mae: Option<Mae>,
    optimizer: ModuleOptimizer,
    settings: &'a MaeSettings,
    data: &'a TrainingData<'a>,
    seed: u64,
    run: serde_json::Value,
    batches_per_epoch: usize,
    order: Option<(usize, Vec<usize>)>,
    device: Device,
}

/// Per patch, 1 when its centre pixel is not ignored.
fn kept_patches(ignored: &[f32], side: usize, patch: usize) -> Vec<f32> {
    let grid = side / patch;
    (0..grid * grid)
        .map(|p| {
            let (y, x) = ((p / grid) * patch + patch / 2, (p % grid) * patch + patch / 2);
            if ignored[y * side + x] > 0.5 {
                0.0
            } else {
                1.0
            }
        })
        .collect()
}

impl TrainTask for MaeTask<'_> {
    fn step(&mut self, step: usize) -> Result<f32> {
        let s = self.settings;
        let arch = s.arch();
        let side = arch.image_size;
        let epoch = step / self.batches_per_epoch;
        let n = self.data.images.len();
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.order = Some((epoch, epoch_order(self.seed, epoch, n)));
        }
        let (_, order) = self.order.as_ref().expect("order set above");
        let first = (step % self.batches_per_epoch) * s.batch_size;
        let members = &order[first..(first + s.batch_size).min(n)];
        // Crops, flips and masks of this step: a pure function of (seed, step).
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x6d61_655f_7472_6169);
        rng.set_stream(step as u64);
        let mut pixels = Vec::with_capacity(members.len() * 3 * side * side);
        let mut weights = Vec::with_capacity(members.len());
        for &i in members {
            let image = &self.data.images[i];
            let crop = s.augment.then(|| Crop::draw(&mut rng, side));
            match &crop {
                Some(c) => pixels.extend(c.apply(image, 3, side)),
                None => pixels.extend_from_slice(image),
            }
            if let Some(ignored) = self.data.ignored {
                let plane = match &crop {
                    Some(c) => c.apply(&ignored[i], 1, side),
                    None => ignored[i].clone(),
                };
                weights.push(kept_patches(&plane, side, arch.patch_size));
            }
        }
        let plan = MaskPlan::random(&mut rng, members.len(), arch.patches(), s.mask_ratio);
        let x = tensor_from_vec(pixels, [members.len(), 3, side, side], &self.device);
        let mae = self.mae.take().expect("network present between steps");
        let pred = mae.forward(x.clone(), &plan);
        let weights = self.data.ignored.is_some().then_some(weights.as_slice());
        let loss = masked_loss_weighted(pred, x, &plan, arch.patch_size, s.norm_pix_loss, weights);
        let value = loss.clone().into_scalar::<f32>();
        if !value.is_finite() {
            return Err(VigilError::Model(format!("mae: training loss became {value} at step {step}")));
        }
        let grads = GradientsParams::from_grads(loss.backward(), &mae);
        let lr = learning_rate_at(s, step, self.batches_per_epoch);
        self.mae = Some(self.optimizer.step(lr, mae, grads));
        Ok(value)
    }

    fn snapshot(&self) -> Result<Checkpoint> {
        Ok(Checkpoint {
            step: 0,
            seed: self.seed,
            rng: None,
            schedule: None,
            meta: serde_json::json!({ "run": self.run }),
            weights: self.mae.as_ref().expect("network present between steps").state(),
            optimizers: vec![optimizer_bytes(&self.optimizer)?],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let s = MaeSettings {
            epochs: 10,
            warmup_epochs: 2,
            base_lr: 2.56,
            batch_size: 100,
            ..MaeSettings::default()
        };
        assert_eq!(s.learning_rate(), 1.0);
        assert_eq!(learning_rate_at(&s, 0, 4), 0.0);
        assert!((learning_rate_at(&s, 4, 4) - 0.5).abs() < 1e-12);
        assert!((learning_rate_at(&s, 8, 4) - 1.0).abs() < 1e-12);
        assert!((learning_rate_at(&s, 24, 4) - 0.5).abs() < 1e-12);
        assert!(learning_rate_at(&s, 39, 4) < 0.01);
    }

    #[test]
    fn crops_stay_inside_and_the_identity_crop_is_the_image() {
        let side = 8;
        let image: Vec<f32> = (0..3 * side * side).map(|v| v as f32).collect();
        let identity = Crop { x0: 0.0, y0: 0.0, w: side as f32, h: side as f32, flip: false };
        assert_eq!(identity.apply(&image, 3, side), image);
        let flipped = Crop { flip: true, ..identity };
        assert_eq!(flipped.apply(&image, 3, side)[0], 7.0);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..100 {
            let c = Crop::draw(&mut rng, side);
            assert!(c.x0 + c.w <= side as f32 && c.y0 + c.h <= side as f32 && c.w >= 1.0 && c.h >= 1.0);
        }
    }
}
