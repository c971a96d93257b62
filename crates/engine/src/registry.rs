//! The method registry: every method vigil knows, how to build it from settings and how to load it
//! from a model file. Adding a method = one `impl Method` and one `entry` line here, plus its crate
//! under `methods/`.

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use vigil_core::{Detector, TensorBag};

/// What the registry needs of a method's detector type.
pub trait Method: Detector + Sized + 'static {
    type Settings: Serialize + DeserializeOwned;
    fn build(settings: Self::Settings) -> vigil_core::Result<Self>;
    fn load(settings: &Value, state: &TensorBag) -> vigil_core::Result<Self>;
    /// Does `fit` learn anything with these settings? A method that learns nothing needs no
    /// training images.
    fn learns(_settings: &Self::Settings) -> bool {
        true
    }
    /// Every setting with the value it takes, as `vigil methods` shows it (settings written as a
    /// preset plus overrides serialise their overrides only).
    fn resolved_settings(settings: &Self::Settings) -> Value {
        serde_json::to_value(settings).expect("settings serialise")
    }
}

impl Method for vigil_acontrario::AcontrarioDetector {
    type Settings = vigil_acontrario::AcontrarioSettings;
    fn build(settings: Self::Settings) -> vigil_core::Result<Self> {
        Ok(Self::new(settings))
    }
    fn learns(settings: &Self::Settings) -> bool {
        settings.statistics != vigil_acontrario::Statistics::TestImage
    }
    fn load(settings: &Value, state: &TensorBag) -> vigil_core::Result<Self> {
        Self::load(settings, state)
    }
}

impl Method for vigil_uflow::UflowDetector {
    type Settings = vigil_uflow::UflowSettings;
    fn build(settings: Self::Settings) -> vigil_core::Result<Self> {
        Ok(Self::new(settings))
    }
    fn load(settings: &Value, state: &TensorBag) -> vigil_core::Result<Self> {
        Self::load(settings, state)
    }
}

impl Method for vigil_fastflow::FastflowDetector {
    type Settings = vigil_fastflow::FastflowSettings;
    fn build(settings: Self::Settings) -> vigil_core::Result<Self> {
        Self::new(settings)
    }
    fn resolved_settings(settings: &Self::Settings) -> Value {
        serde_json::to_value(vigil_fastflow::FastflowSpec::complete(settings)).expect("settings serialise")
    }
    fn load(settings: &Value, state: &TensorBag) -> vigil_core::Result<Self> {
        Self::load(settings, state)
    }
}

impl Method for vigil_stfpm::StfpmDetector {
    type Settings = vigil_stfpm::StfpmSettings;
    fn build(settings: Self::Settings) -> vigil_core::Result<Self> {
        Self::new(settings)
    }
    fn resolved_settings(settings: &Self::Settings) -> Value {
        serde_json::to_value(vigil_stfpm::StfpmSpec::complete(settings)).expect("settings serialise")
    }
    fn load(settings: &Value, state: &TensorBag) -> vigil_core::Result<Self> {
        Self::load(settings, state)
    }
}

impl Method for vigil_reverse_distillation::RdDetector {
    type Settings = vigil_reverse_distillation::RdSettings;
    fn build(settings: Self::Settings) -> vigil_core::Result<Self> {
        Self::new(settings)
    }
    fn resolved_settings(settings: &Self::Settings) -> Value {
        serde_json::to_value(vigil_reverse_distillation::RdSpec::complete(settings))
            .expect("settings serialise")
    }
    fn load(settings: &Value, state: &TensorBag) -> vigil_core::Result<Self> {
        Self::load(settings, state)
    }
}

impl Method for vigil_cfa::CfaDetector {
    type Settings = vigil_cfa::CfaSettings;
    fn build(settings: Self::Settings) -> vigil_core::Result<Self> {
        Self::new(settings)
    }
    fn resolved_settings(settings: &Self::Settings) -> Value {
        serde_json::to_value(vigil_cfa::CfaSpec::complete(settings)).expect("settings serialise")
    }
    fn load(settings: &Value, state: &TensorBag) -> vigil_core::Result<Self> {
        Self::load(settings, state)
    }
}

impl Method for vigil_csflow::CsflowDetector {
    type Settings = vigil_csflow::CsflowSettings;
    fn build(settings: Self::Settings) -> vigil_core::Result<Self> {
        Self::new(settings)
    }
    fn resolved_settings(settings: &Self::Settings) -> Value {
        serde_json::to_value(vigil_csflow::CsflowSpec::complete(settings)).expect("settings serialise")
    }
    fn load(settings: &Value, state: &TensorBag) -> vigil_core::Result<Self> {
        Self::load(settings, state)
    }
}

impl Method for vigil_patchcore::PatchcoreDetector {
    type Settings = vigil_patchcore::PatchcoreSettings;
    fn build(settings: Self::Settings) -> vigil_core::Result<Self> {
        Self::new(settings)
    }
    fn load(settings: &Value, state: &TensorBag) -> vigil_core::Result<Self> {
        Self::load(settings, state)
    }
}

impl Method for vigil_padim::PadimDetector {
    type Settings = vigil_padim::PadimSettings;
    fn build(settings: Self::Settings) -> vigil_core::Result<Self> {
        Self::new(settings)
    }
    fn load(settings: &Value, state: &TensorBag) -> vigil_core::Result<Self> {
        Self::load(settings, state)
    }
}

impl Method for vigil_draem::DraemDetector {
    type Settings = vigil_draem::DraemSettings;
    fn build(settings: Self::Settings) -> vigil_core::Result<Self> {
        Self::new(settings)
    }
    fn resolved_settings(settings: &Self::Settings) -> Value {
        serde_json::to_value(vigil_draem::DraemSpec::complete(settings)).expect("settings serialise")
    }
    fn load(settings: &Value, state: &TensorBag) -> vigil_core::Result<Self> {
        Self::load(settings, state)
    }
}

impl Method for vigil_ddad::DdadDetector {
    type Settings = vigil_ddad::DdadSettings;
    fn build(settings: Self::Settings) -> vigil_core::Result<Self> {
        Self::new(settings)
    }
    fn resolved_settings(settings: &Self::Settings) -> Value {
        serde_json::to_value(vigil_ddad::DdadSpec::complete(settings)).expect("settings serialise")
    }
    fn load(settings: &Value, state: &TensorBag) -> vigil_core::Result<Self> {
        Self::load(settings, state)
    }
}

impl Method for vigil_rifa::RifaDetector {
    type Settings = vigil_rifa::RifaSpec;
    fn build(settings: Self::Settings) -> vigil_core::Result<Self> {
        Self::new(settings.0)
    }
    fn resolved_settings(settings: &Self::Settings) -> Value {
        settings.complete()
    }
    fn load(settings: &Value, state: &TensorBag) -> vigil_core::Result<Self> {
        Self::load(settings, state)
    }
}

impl Method for vigil_dad::DadDetector {
    type Settings = vigil_dad::DadSpec;
    fn build(settings: Self::Settings) -> vigil_core::Result<Self> {
        Self::new(settings.0)
    }
    fn resolved_settings(settings: &Self::Settings) -> Value {
        settings.complete()
    }
    fn load(settings: &Value, state: &TensorBag) -> vigil_core::Result<Self> {
        Self::load(settings, state)
    }
}

impl Method for vigil_mae::MaeDetector {
    type Settings = vigil_mae::MaeSettings;
    fn build(settings: Self::Settings) -> vigil_core::Result<Self> {
        Self::new(settings)
    }
    fn learns(settings: &Self::Settings) -> bool {
        settings.trains()
    }
    fn resolved_settings(settings: &Self::Settings) -> Value {
        settings.complete()
    }
    fn load(settings: &Value, state: &TensorBag) -> vigil_core::Result<Self> {
        Self::load(settings, state)
    }
}

pub struct MethodEntry {
    pub name: &'static str,
    pub summary: &'static str,
    pub default_settings: Value,
    /// The defaults with every setting's value (for listing; see [`Method::resolved_settings`]).
    pub resolved_defaults: Value,
    pub build: fn(&Value) -> Result<Box<dyn Detector>>,
    pub load: fn(&Value, &TensorBag) -> Result<Box<dyn Detector>>,
    pub learns: fn(&Value) -> bool,
}

fn build_as<M: Method>(settings: &Value) -> Result<Box<dyn Detector>> {
    let settings: M::Settings = serde_json::from_value(settings.clone())?;
    Ok(Box::new(M::build(settings)?))
}

fn learns_as<M: Method>(settings: &Value) -> bool {
    serde_json::from_value::<M::Settings>(settings.clone()).is_ok_and(|s| M::learns(&s))
}

fn load_as<M: Method>(settings: &Value, state: &TensorBag) -> Result<Box<dyn Detector>> {
    Ok(Box::new(M::load(settings, state)?))
}

/// The one generic registry entry of a method.
fn entry<M: Method>(name: &'static str, summary: &'static str, defaults: M::Settings) -> MethodEntry {
    MethodEntry {
        name,
        summary,
        resolved_defaults: M::resolved_settings(&defaults),
        default_settings: serde_json::to_value(defaults).expect("settings serialise"),
        build: build_as::<M>,
        load: load_as::<M>,
        learns: learns_as::<M>,
    }
}

pub fn registry() -> Vec<MethodEntry> {
    use vigil_draem::{DraemDetector, DraemSettings, Variant};
    vec![
        entry::<vigil_acontrario::AcontrarioDetector>(
            "acontrario",
            "A contrario multi-scale detector (thesis ch. 3): Patch-PCA or Gabor features, Mahalanobis distance, \
             number of false alarms; threshold NFA <= 1 needs no labelled anomaly.",
            Default::default(),
        ),
        entry::<vigil_uflow::UflowDetector>(
            "uflow",
            "U-Flow (thesis ch. 5): U-shaped normalizing flow on multi-scale pretrained features; a contrario \
             segmentation on the max-tree of the latent, so NFA <= 1 is the threshold.",
            Default::default(),
        ),
        entry::<vigil_fastflow::FastflowDetector>(
            "fastflow",
            "FastFlow: a trainable LayerNorm and an 8-step 2D normalizing flow per scale on frozen CNN features at \
             strides 4/8/16; map = mean over scales of -exp(-mean_c z^2 / 2), score = max. Default: the CPU preset \
             (MobileNetV2, 128 px, 40 epochs); `preset=paper` is anomalib's (ResNet-18 weights, 256 px, 500 epochs).",
            Default::default(),
        ),
        entry::<vigil_stfpm::StfpmDetector>(
            "stfpm",
            "STFPM: a student CNN of the teacher's architecture, trained from scratch (SGD) to match a frozen \
             pretrained teacher's channel-normalised features at strides 4/8/16; map = product over layers of \
             half the squared feature difference, score = max. Default: the CPU preset (MobileNetV2, 128 px, \
             40 epochs); `preset=paper` is anomalib's (ResNet-18 weights, 256 px, 100 epochs).",
            Default::default(),
        ),
        entry::<vigil_reverse_distillation::RdDetector>(
            "reverse_distillation",
            "Reverse Distillation: a trainable one-class bottleneck and a reversed (transposed-conv) decoder that \
             rebuild a frozen pretrained encoder's features at strides 4/8/16 from their compact embedding \
             (Adam, cosine loss); map = sum over layers of 1 - cos, up-sampled and blurred (sigma 4), score = \
             max. Default: the CPU preset (MobileNetV2, 128 px, 40 epochs); `preset=paper` is anomalib's \
             (ResNet-18 weights, 256 px, 200 epochs).",
            Default::default(),
        ),
        entry::<vigil_cfa::CfaDetector>(
            "cfa",
            "CFA: a trainable CoordConv 1x1 patch descriptor on pooled multi-layer pretrained features and a \
             memory of centroids (the mean descriptor map), trained to pull each descriptor to its nearest \
             centroids; map = softmin-weighted nearest distance, smoothed, score = max. Default: the CPU preset \
             (MobileNetV2, 128 px, 30 epochs); `preset=paper` is the paper's (Wide-ResNet-50-2, 256 px).",
            Default::default(),
        ),
        entry::<vigil_csflow::CsflowDetector>(
            "csflow",
            "CS-Flow: one frozen CNN layer on the image at 3 scales, 4 cross-scale coupling blocks (fixed \
             permutations, cross-convolution subnets with 1024 hidden channels, atan soft clamp) trained by \
             maximum likelihood; map = product over scales of the up-sampled mean_c z², score = mean z²/2. \
             Default: the CPU preset (EfficientNet-Lite0 _blocks.10, 128 px, 12 epochs); `preset=paper` is the \
             paper's flow at 768 px for 240 epochs (on EfficientNet-Lite0 _blocks.14: no EfficientNet-B5 yet).",
            Default::default(),
        ),
        entry::<vigil_patchcore::PatchcoreDetector>(
            "patchcore",
            "PatchCore: locally aware patch features of a pretrained backbone, greedy coreset memory bank \
             (streamed, memory-bounded, optional f16), nearest-neighbour distance, re-weighted image score.",
            Default::default(),
        ),
        entry::<vigil_padim::PadimDetector>(
            "padim",
            "PaDiM: per-position Gaussian of multi-layer pretrained features (streamed mean/covariance, random \
             channel subset), Mahalanobis distance map.",
            Default::default(),
        ),
        entry::<DraemDetector>(
            "draem",
            "DRAEM: reconstructive auto-encoder + discriminative U-Net trained on synthetic anomalies (Perlin \
             masks, texture source, cutout). Default: the CPU preset (64 px, narrow widths, 400 steps); \
             `preset=paper` is the official configuration.",
            DraemSettings::cpu(Variant::Draem),
        ),
        entry::<DraemDetector>(
            "draem-unetpp",
            "DRAEM with a Nested U-Net (UNet++) reconstructive sub-network (seed 000). Default: the CPU preset; \
             `preset=paper` is the seed's configuration (512 px, lambda 2 on SSIM, opacity [0.2, 1]).",
            DraemSettings::cpu(Variant::Unetpp),
        ),
        entry::<vigil_ddad::DdadDetector>(
            "ddad",
            "DDAD: a diffusion U-Net of the normal images; each test image is noised to t=250 and denoised in 10 \
             DDIM steps pulled toward itself (weight w); map = feature distance + rescaled pixel distance, \
             smoothed, score = max. Default: the CPU preset (64 px U-Net, 600 steps, MobileNetV2 features); \
             `preset=paper` is the published one (256 px, Wide-ResNet-50-2). No domain adaptation yet.",
            Default::default(),
        ),
        entry::<vigil_rifa::RifaDetector>(
            "rifa",
            "RIFA (thesis 7.10): a score-based diffusion model of the normal images inpaints K random masks \
             hiding 75% of the image; map = mean over the masks of the per-pixel distance between inpainting and \
             image, smoothed; second stage: inpaint where that map exceeds (min+max)/2 and measure again; score = \
             max. Default: the CPU preset (64 px U-Net, VP SDE, 50 predictor-corrector steps, K = 4); \
             `preset=paper` is VE at 256 px, K = 16 (the thesis' Stable Diffusion inpainter is not available).",
            Default::default(),
        ),
        entry::<vigil_dad::DadDetector>(
            "dad",
            "DAD (thesis 7.6-7.8): a score-based diffusion model of the normal images maps the image through the \
             probability-flow ODE to its latent; stage 1 = NLM-denoised latent norm and an a contrario detection \
             in noise (log10 NFA < 3, closing, median, dilation); stage 2 = distance between the image and its \
             inpainting over the detected region (`stage=likelihood` reports stage 1). Default: the CPU preset \
             (64 px U-Net, VP SDE, Heun ODE 50 steps); `preset=paper` is VE at 256 px with RK45 1e-5.",
            Default::default(),
        ),
        entry::<vigil_mae::MaeDetector>(
            "mae",
            "MAE with a sliding 2x2-patch mask (seed 002): a ViT masked autoencoder (He et al.) reconstructs every \
             patch from its visible neighbours in s^2 = 4 complementary passes; map = 0.5 (1 - SSIM) + 0.5 L1 \
             between image and composite reconstruction, smoothed and opened, score = mean. Default: the CPU \
             preset (a small MAE pre-trained from scratch on the normal images, 128 px, patch 8, 200 epochs); \
             `preset=vit_base|vit_large,weights=mae_visualize_vit_*.pth` uses the official pretrained MAE and \
             trains nothing.",
            Default::default(),
        ),
    ]
}

pub fn find(name: &str) -> Result<MethodEntry> {
    let names: Vec<&str> = registry().iter().map(|m| m.name).collect();
    registry()
        .into_iter()
        .find(|m| m.name == name)
        .ok_or_else(|| anyhow!("unknown method '{name}'; known methods: {}", names.join(", ")))
}

/// A method spec `name[:key=value,...]` plus extra `key=value` parameters.
#[derive(Clone, Debug)]
pub struct MethodSpec {
    pub name: String,
    pub settings: Value,
}

impl MethodSpec {
    pub fn parse(spec: &str, extra: &[String]) -> Result<MethodSpec> {
        let (name, inline) = match spec.split_once(':') {
            Some((n, rest)) => (n.trim(), rest),
            None => (spec.trim(), ""),
        };
        let entry = find(name)?;
        let mut settings = entry.default_settings.clone();
        let pairs = split_top_level(inline).into_iter().filter(|p| !p.trim().is_empty());
        for pair in pairs.chain(extra.iter().cloned()) {
            let (key, value) =
                pair.split_once('=').ok_or_else(|| anyhow!("method parameter '{pair}' is not key=value"))?;
            set_path(&mut settings, key.trim(), parse_value(value.trim()), name)?;
        }
        // Round-trip through the settings type so a mistyped value is caught now, with its name.
        (entry.build)(&settings).with_context(|| format!("invalid settings for method '{name}'"))?;
        Ok(MethodSpec { name: name.to_string(), settings })
    }

    /// A short label for tables: the name plus the parameters that differ from the defaults.
    pub fn label(&self) -> String {
        let defaults = find(&self.name).map(|e| e.default_settings).unwrap_or(Value::Null);
        let mut diffs = Vec::new();
        diff_settings("", &defaults, &self.settings, &mut diffs);
        if diffs.is_empty() {
            self.name.clone()
        } else {
            format!("{}({})", self.name, diffs.join(","))
        }
    }

    /// Does the method learn from training images with these settings?
    pub fn needs_training(&self) -> bool {
        find(&self.name).is_ok_and(|e| (e.learns)(&self.settings))
    }

    pub fn build(&self) -> Result<Box<dyn Detector>> {
        (find(&self.name)?.build)(&self.settings)
    }
}

fn diff_settings(prefix: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, vb) in b {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                match a.get(k) {
                    Some(va) => diff_settings(&key, va, vb, out),
                    None => out.push(format!("{key}={vb}")),
                }
            }
        }
        _ if a != b => out.push(format!("{prefix}={}", b.to_string().trim_matches('"'))),
        _ => {}
    }
}

/// Split `a=1,b=[x,y],c="p,q"` at the commas that are not inside brackets or quotes.
fn split_top_level(text: &str) -> Vec<String> {
    let (mut parts, mut current, mut depth, mut quoted) = (Vec::new(), String::new(), 0i32, false);
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            '[' | '{' if !quoted => depth += 1,
            ']' | '}' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    parts
}

fn parse_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// Set `a.b.c = value`, refusing keys the method does not have (a typo must not pass silently).
fn set_path(settings: &mut Value, key: &str, value: Value, method: &str) -> Result<()> {
    let mut node = settings;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let Value::Object(map) = node else { bail!("setting '{key}' of method '{method}' is not a table") };
        let known: Vec<String> = map.keys().cloned().collect();
        let Some(child) = map.get_mut(*part) else {
            bail!("method '{method}' has no setting '{key}'; its settings are: {}", known.join(", "))
        };
        if i + 1 == parts.len() {
            *child = value;
            return Ok(());
        }
        node = child;
    }
    Ok(())
}

pub fn load(name: &str, settings: &Value, state: &TensorBag) -> Result<Box<dyn Detector>> {
    (find(name)?.load)(settings, state).with_context(|| format!("cannot load the '{name}' model"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_settings_may_hold_lists() {
        assert_eq!(split_top_level(r#"a=1,layers=["x","y"],b=2"#), vec!["a=1", r#"layers=["x","y"]"#, "b=2"]);
        let spec = MethodSpec::parse("acontrario:feature=gabor,gabor_sizes=[7,15],scales=2", &[]).unwrap();
        assert_eq!(spec.settings["gabor_sizes"], serde_json::json!([7, 15]));
        assert_eq!(spec.label(), "acontrario(feature=gabor,gabor_sizes=[7,15],scales=2)");
    }

    #[test]
    fn unknown_setting_is_named() {
        let err = MethodSpec::parse("acontrario:featur=gabor", &[]).err().unwrap().to_string();
        assert!(err.contains("featur"), "{err}");
    }
}
