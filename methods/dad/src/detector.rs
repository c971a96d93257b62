//! DAD behind vigil's [`Detector`].

use burn::tensor::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use vigil_core::{
    ChannelMode, Detector, FitContext, Image, ImageSource, Map, Mask, Result, ScoreOutput, TensorBag,
    VigilError,
};
use vigil_diffusion::{
    inpaint, probability_flow_latent, train_score_net, ScoreNet, ScoreTrainRun, TrainingImages, UNet,
    UNetSettings,
};
use vigil_nn::{default_device, tensor_from_vec, tensor_to_vec};

use crate::morphology::{close, dilate, median};
use crate::nlm::nl_means;
use crate::{DadSettings, SdeKind, Stage};

/// The checkpoint file of the score network's training in the fit's checkpoint folder.
pub const CHECKPOINT_FILE: &str = "dad-score.ckpt";
const STATE_PREFIX: &str = "unet.";

pub struct DadDetector {
    settings: DadSettings,
    unet: UNetSettings,
    net: Option<UNet>,
    session_limit: Option<usize>,
    show_progress: bool,
    losses: Vec<f32>,
}

/// Everything DAD computes for one image, at the network's size.
pub struct DadMaps {
    /// Stage 1: the channel L2 norm of the NLM-denoised latent, in prior standard deviations.
    pub likelihood: Map,
    /// log10 NFA of the detection in noise on the NLM-denoised latent.
    pub log10_nfa: Map,
    /// The region to inpaint: log10 NFA below the level, closed, median-filtered and dilated.
    pub detection: Vec<bool>,
    /// Stage 2: the distance between the image and its inpainting (when the stage is run).
    pub inpainting: Option<Map>,
}

impl DadDetector {
    pub fn new(settings: DadSettings) -> Result<Self> {
        settings.validate()?;
        Ok(DadDetector {
            unet: settings.unet()?,
            settings,
            net: None,
            session_limit: None,
            show_progress: false,
            losses: Vec::new(),
        })
    }

    pub fn load(settings: &serde_json::Value, state: &TensorBag) -> Result<Self> {
        // Complete settings, or a preset with overrides (nulls take the preset's values).
        let settings: DadSettings = serde_json::from_value::<crate::DadSpec>(settings.clone())
            .map(|spec| spec.0)
            .map_err(|e| VigilError::Model(format!("DAD settings in the model file: {e}")))?;
        let mut detector = Self::new(settings)?;
        let mut unet_state = TensorBag::new();
        for name in state.names().filter(|n| n.starts_with(STATE_PREFIX)) {
            unet_state.put_f32(&name[STATE_PREFIX.len()..], state.shape(name)?, state.f32(name, None)?);
        }
        detector.net = Some(UNet::new(&detector.unet, &default_device())?.load_state_dict(&unet_state)?);
        Ok(detector)
    }

    pub fn settings_struct(&self) -> &DadSettings {
        &self.settings
    }

    pub fn set_session_limit(&mut self, steps: Option<usize>) {
        self.session_limit = steps;
    }

    /// Show progress bars over the ODE and the inpainting steps (set by `fit` from its context).
    pub fn set_progress(&mut self, show: bool) {
        self.show_progress = show;
    }

    pub fn losses(&self) -> &[f32] {
        &self.losses
    }

    fn to_model_range(&self, v: f32) -> f32 {
        match self.settings.sde {
            SdeKind::Ve => v,
            SdeKind::Vp => 2.0 * v - 1.0,
        }
    }

    fn range_width(&self) -> f32 {
        match self.settings.sde {
            SdeKind::Ve => 1.0,
            SdeKind::Vp => 2.0,
        }
    }

    fn bar(&self, len: u64, label: &str) -> indicatif::ProgressBar {
        if self.show_progress {
            vigil_core::progress::bar(len, label)
        } else {
            indicatif::ProgressBar::hidden()
        }
    }

    /// Both stages at the network's size.
    pub fn infer(&self, image: &Image) -> Result<DadMaps> {
        let net = self.net.as_ref().ok_or_else(|| VigilError::Model("DAD model is not trained".into()))?;
        let st = &self.settings;
        let s = self.unet.image_size;
        let plane = s * s;
        let input = image.to_rgb().resize_bilinear(s, s);
        let values: Vec<f32> = input.data.iter().map(|&v| self.to_model_range(v)).collect();
        let x: Tensor<4> = tensor_from_vec(values, [1, 3, s, s], &default_device());
        let sde = st.sde();
        let score = ScoreNet { net, sde };

        // Stage 1: latent, NLM, detection in noise, morphology.
        let bar = self.bar(1000, "dad ode");
        let latent = probability_flow_latent(&score, &sde, x.clone(), &st.ode, &mut |t| {
            bar.set_position((t * 1000.0) as u64)
        })?;
        bar.finish_and_clear();
        let z = nl_means(&tensor_to_vec(latent.z), 3, s, s, &st.nlm())?;
        let prior = sde.prior_std() as f32;
        let likelihood: Vec<f32> = (0..plane)
            .map(|p| (0..3).map(|c| z[c * plane + p].powi(2)).sum::<f32>().sqrt() / prior)
            .collect();
        let likelihood = Map::new(s, s, likelihood)?;
        likelihood.check_finite("DAD latent map")?;
        let channels: Vec<Vec<f32>> = z.chunks(plane).map(|c| c.to_vec()).collect();
        let log10_nfa = vigil_nfa::noise::log10_nfa_in_noise(&channels, s, s)?;
        let detected: Vec<bool> = log10_nfa.data.iter().map(|&v| (v as f64) < st.nfa_level).collect();
        let detection = dilate(
            &median(&close(&detected, s, s, st.closing_radius), s, s, st.median_size),
            s,
            s,
            st.dilation_radius,
        );

        // Stage 2: inpaint the detection and measure the change.
        let inpainting = match st.stage {
            Stage::Likelihood => None,
            Stage::Inpainting if !detection.contains(&true) => Some(Map::filled(s, s, 0.0)),
            Stage::Inpainting => {
                let known: Vec<f32> = detection.iter().map(|&d| if d { 0.0 } else { 1.0 }).collect();
                let mask = tensor_from_vec(known, [1, 1, s, s], &x.device());
                let mut rng = ChaCha8Rng::seed_from_u64(st.inpaint_seed);
                let bar = self.bar(sde.steps() as u64, "dad inpaint");
                let filled = inpaint(&score, &sde, &x, &mask, &st.inpainting(), &mut rng, &mut |done, _| {
                    bar.set_position(done as u64)
                })?;
                bar.finish_and_clear();
                let difference = tensor_to_vec((filled - x).div_scalar(self.range_width()));
                let distance: Vec<f32> = (0..plane)
                    .map(|p| (0..3).map(|c| difference[c * plane + p].powi(2)).sum::<f32>().sqrt())
                    .collect();
                let map = Map::new(s, s, distance)?;
                let map = if st.sigma > 0.0 {
                    map.gaussian_blur_with(st.sigma, vigil_core::BlurBorder::WholeSample)
                } else {
                    map
                };
                map.check_finite("DAD inpainting map")?;
                Some(map)
            }
        };
        Ok(DadMaps { likelihood, log10_nfa, detection, inpainting })
    }
}

impl std::fmt::Debug for DadDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DadDetector")
            .field("settings", &self.settings)
            .field("trained", &self.net.is_some())
            .finish()
    }
}

impl Detector for DadDetector {
    fn method(&self) -> &'static str {
        "dad"
    }

    fn channel_mode(&self) -> ChannelMode {
        ChannelMode::Rgb
    }

    fn fit(&mut self, train: &dyn ImageSource, ctx: &FitContext) -> Result<()> {
        if train.is_empty() {
            return Err(VigilError::invalid("DAD needs at least one training image"));
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
            label: "dad".into(),
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
            mask.check_fits(image, "dad")?;
            if mask.data.iter().all(|&ignored| ignored) {
                return Err(VigilError::invalid(
                    "the ignore mask covers every pixel; nothing is left to score",
                ));
            }
        }
        let maps = self.infer(image)?;
        let (w, h) = (image.width, image.height);
        let map = maps.inpainting.unwrap_or(maps.likelihood).resize_bilinear(w, h);
        let image_score = match ignore {
            None => map.max(),
            Some(mask) => {
                let kept = map.data.iter().zip(&mask.data).filter(|(_, &ignored)| !ignored).map(|(v, _)| *v);
                kept.fold(None, |m: Option<f32>, v| Some(m.map_or(v, |m| m.max(v)))).ok_or_else(|| {
                    VigilError::invalid("the ignore mask covers every pixel; nothing is left to score")
                })?
            }
        };
        Ok(ScoreOutput {
            map,
            image_score: Some(image_score),
            log10_nfa: Some(maps.log10_nfa.resize_bilinear(w, h)),
        })
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).expect("settings serialise")
    }

    fn state(&self) -> Result<TensorBag> {
        let net = self.net.as_ref().ok_or_else(|| VigilError::Model("DAD model is not trained".into()))?;
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
