//! RIFA behind vigil's [`Detector`]: fit trains the score model on the normal images; score
//! inpaints K masked copies of the image at once and averages their discrepancy maps.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use vigil_core::{
    ChannelMode, Detector, FitContext, Image, ImageSource, Map, Mask, Result, ScoreOutput, TensorBag,
    VigilError,
};
use vigil_diffusion::{
    inpaint, train_score_net, ScoreNet, ScoreTrainRun, TrainingImages, UNet, UNetSettings,
};
use vigil_nn::{default_device, tensor_from_vec, tensor_to_vec};

use crate::masks::draw_masks;
use crate::{RifaSettings, RifaSpec, SdeKind};

/// The checkpoint file of the score network's training in the fit's checkpoint folder.
pub const CHECKPOINT_FILE: &str = "rifa-score.ckpt";

/// Model-file prefix of the U-Net's tensors.
const STATE_PREFIX: &str = "unet.";

pub struct RifaDetector {
    settings: RifaSettings,
    unet: UNetSettings,
    net: Option<UNet>,
    session_limit: Option<usize>,
    show_progress: bool,
    losses: Vec<f32>,
}

/// The maps of one image at the network's size.
pub struct RifaMaps {
    /// Mean discrepancy over the K random masks, smoothed.
    pub first: Map,
    /// Mean discrepancy of K inpaintings of the region where `first` exceeds (min + max)/2.
    pub second: Option<Map>,
}

impl RifaDetector {
    pub fn new(settings: RifaSettings) -> Result<Self> {
        settings.validate()?;
        Ok(RifaDetector {
            unet: settings.unet()?,
            settings,
            net: None,
            session_limit: None,
            show_progress: false,
            losses: Vec::new(),
        })
    }

    /// Rebuild a trained detector from its saved settings and state.
    pub fn load(settings: &serde_json::Value, state: &TensorBag) -> Result<Self> {
        // Complete settings, or a preset with overrides (nulls take the preset's values).
        let settings: RifaSettings = serde_json::from_value::<crate::RifaSpec>(settings.clone())
            .map(|spec| spec.0)
            .map_err(|e| VigilError::Model(format!("RIFA settings in the model file: {e}")))?;
        let mut detector = Self::new(settings)?;
        let mut unet_state = TensorBag::new();
        for name in state.names().filter(|n| n.starts_with(STATE_PREFIX)) {
            unet_state.put_f32(&name[STATE_PREFIX.len()..], state.shape(name)?, state.f32(name, None)?);
        }
        detector.net = Some(UNet::new(&detector.unet, &default_device())?.load_state_dict(&unet_state)?);
        Ok(detector)
    }

    pub fn settings_struct(&self) -> &RifaSettings {
        &self.settings
    }

    /// Train at most up to `steps` total steps in the next `fit` (needs a checkpoint folder).
    pub fn set_session_limit(&mut self, steps: Option<usize>) {
        self.session_limit = steps;
    }

    /// Show a progress bar over the inpainting steps of each scored image (set by `fit` from its
    /// context).
    pub fn set_progress(&mut self, show: bool) {
        self.show_progress = show;
    }

    pub fn losses(&self) -> &[f32] {
        &self.losses
    }

    /// Image values in [0, 1] to the model's range: [0, 1] for VE, [−1, 1] for VP.
    fn to_model_range(&self, v: f32) -> f32 {
        match self.settings.sde {
            SdeKind::Ve => v,
            SdeKind::Vp => 2.0 * v - 1.0,
        }
    }

    /// The width of [0, 1] in the model's range (discrepancies are reported in image units).
    fn range_width(&self) -> f32 {
        match self.settings.sde {
            SdeKind::Ve => 1.0,
            SdeKind::Vp => 2.0,
        }
    }

    /// Inpaint the K copies of `x` `[1, 3, S, S]` where `known` (K planes of S×S) is 0, and return
    /// the mean over the copies of the per-pixel L2 distance (over channels, in [0, 1] units)
    /// between each inpainting and the image, smoothed.
    fn mean_discrepancy(
        &self,
        net: &UNet,
        x: &burn::tensor::Tensor<4>,
        known: &[Vec<f32>],
        rng: &mut ChaCha8Rng,
        stage: &str,
    ) -> Result<Map> {
        let s = self.unet.image_size;
        let k = known.len();
        let device = x.device();
        let data = x.clone().repeat_dim(0, k);
        let mask = tensor_from_vec(known.concat(), [k, 1, s, s], &device);
        let sde = self.settings.sde();
        let bar = if self.show_progress {
            vigil_core::progress::bar(sde.steps() as u64, &format!("rifa {stage}"))
        } else {
            indicatif::ProgressBar::hidden()
        };
        let inpainted = inpaint(
            &ScoreNet { net, sde },
            &sde,
            &data,
            &mask,
            &self.settings.inpainting(),
            rng,
            &mut |done, _| bar.set_position(done as u64),
        )?;
        bar.finish_and_clear();
        let difference = tensor_to_vec((inpainted - data).div_scalar(self.range_width()));
        let plane = s * s;
        let mut mean = vec![0.0f32; plane];
        for image in difference.chunks(3 * plane) {
            for (p, m) in mean.iter_mut().enumerate() {
                let squared: f32 = (0..3).map(|c| image[c * plane + p].powi(2)).sum();
                *m += squared.sqrt() / k as f32;
            }
        }
        let map = Map::new(s, s, mean)?;
        let map = if self.settings.sigma > 0.0 {
            map.gaussian_blur_with(self.settings.sigma, vigil_core::BlurBorder::WholeSample)
        } else {
            map
        };
        map.check_finite("RIFA anomaly map")?;
        Ok(map)
    }

    /// Both stages' maps at the network's size.
    pub fn infer(&self, image: &Image) -> Result<RifaMaps> {
        let net = self.net.as_ref().ok_or_else(|| VigilError::Model("RIFA model is not trained".into()))?;
        let s = self.unet.image_size;
        let input = image.to_rgb().resize_bilinear(s, s);
        let values: Vec<f32> = input.data.iter().map(|&v| self.to_model_range(v)).collect();
        let x = tensor_from_vec(values, [1, 3, s, s], &default_device());
        let st = &self.settings;
        let mut rng = ChaCha8Rng::seed_from_u64(st.inpaint_seed);
        let masks = draw_masks(st.masks, s, st.patch_size, st.mask_ratio, st.realizations, &mut rng);
        let first = self.mean_discrepancy(net, &x, &masks, &mut rng, "stage 1")?;
        let second = if st.second_stage {
            let threshold = (first.min() + first.max()) / 2.0;
            let known: Vec<f32> = first.data.iter().map(|&v| if v > threshold { 0.0 } else { 1.0 }).collect();
            let known = vec![known; st.realizations];
            Some(self.mean_discrepancy(net, &x, &known, &mut rng, "stage 2")?)
        } else {
            None
        };
        Ok(RifaMaps { first, second })
    }
}

impl std::fmt::Debug for RifaDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RifaDetector")
            .field("settings", &self.settings)
            .field("trained", &self.net.is_some())
            .finish()
    }
}

impl Detector for RifaDetector {
    fn method(&self) -> &'static str {
        "rifa"
    }

    fn channel_mode(&self) -> ChannelMode {
        ChannelMode::Rgb
    }

    fn fit(&mut self, train: &dyn ImageSource, ctx: &FitContext) -> Result<()> {
        if train.is_empty() {
            return Err(VigilError::invalid("RIFA needs at least one training image"));
        }
        let s = self.unet.image_size;
        let images: Vec<Vec<f32>> = (0..train.len())
            .into_par_iter()
            .map(|i| {
                let image = train.load(i).map_err(|e| VigilError::file(train.name(i), e.to_string()))?;
                Ok(image
                    .to_rgb()
                    .resize_bilinear(s, s)
                    .data
                    .iter()
                    .map(|&v| self.to_model_range(v))
                    .collect())
            })
            .collect::<Result<_>>()?;
        let data = ctx.checkpoint_dir.as_ref().map(|_| train.fingerprint()).transpose()?;
        let run = ScoreTrainRun {
            seed: ctx.seed,
            checkpoint_path: ctx.checkpoint_dir.as_ref().map(|d| d.join(CHECKPOINT_FILE)),
            session_limit: self.session_limit,
            show_progress: ctx.show_progress,
            label: "rifa".into(),
            data,
        };
        let trained = train_score_net(
            &self.unet,
            &self.settings.sde(),
            &self.settings.train(),
            &TrainingImages::new(images, 3, s)?,
            &run,
        )?;
        self.losses = trained.losses;
        self.net = Some(trained.net);
        self.show_progress = ctx.show_progress;
        Ok(())
    }

    fn score(&self, image: &Image, ignore: Option<&Mask>) -> Result<ScoreOutput> {
        if let Some(mask) = ignore {
            mask.check_fits(image, "rifa")?;
            if mask.data.iter().all(|&ignored| ignored) {
                return Err(VigilError::invalid(
                    "the ignore mask covers every pixel; nothing is left to score",
                ));
            }
        }
        let maps = self.infer(image)?;
        let map = maps.second.unwrap_or(maps.first).resize_bilinear(image.width, image.height);
        // The image score is the map's maximum over the kept pixels (the pipeline clears the
        // ignored ones in the map).
        let image_score = match ignore {
            None => map.max(),
            Some(mask) => {
                let kept = map.data.iter().zip(&mask.data).filter(|(_, &ignored)| !ignored).map(|(v, _)| *v);
                kept.fold(None, |m: Option<f32>, v| Some(m.map_or(v, |m| m.max(v)))).ok_or_else(|| {
                    VigilError::invalid("the ignore mask covers every pixel; nothing is left to score")
                })?
            }
        };
        Ok(ScoreOutput { map, image_score: Some(image_score), log10_nfa: None })
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).expect("settings serialise")
    }

    fn state(&self) -> Result<TensorBag> {
        let net = self.net.as_ref().ok_or_else(|| VigilError::Model("RIFA model is not trained".into()))?;
        let unet_state = net.state_dict();
        let mut state = TensorBag::new();
        for name in unet_state.names() {
            state.put_f32(
                &format!("{STATE_PREFIX}{name}"),
                unet_state.shape(name)?,
                unet_state.f32(name, None)?,
            );
        }
        Ok(state)
    }
}

impl RifaSpec {
    /// Every field written out (what `vigil methods` shows).
    pub fn complete(&self) -> serde_json::Value {
        serde_json::to_value(&self.0).expect("settings serialise")
    }
}
