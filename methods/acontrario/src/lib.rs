//! A contrario multi-scale detector (Patch-PCA / Gabor / CNN features, Mahalanobis, NFA).
//!
//! Tailanian's thesis, chapter 3: an image pyramid; per scale and colour channel, features from
//! patch PCA or a Gabor bank; the diagonal Mahalanobis distance of each pixel's features to their
//! mean, which is χ²(m) under the null hypothesis; a number of false alarms per pixel (PixelNFA)
//! or per window (BlockNFA); the minimum over channels, then over scales after up-sampling.
//! The map is −log10 NFA, so the a contrario threshold NFA = 1 sits at 0.
//!
//! [`Feature::Cnn`] is the thesis' third feature and the one the author's code implements
//! (see [`cnn`]): pretrained CNN features at stride 4, decorrelated by PCA, one χ²(1) distance map
//! per component up-sampled to the network input, then [`NfaVariant::Region`] (4-connected regions
//! tested as a whole, minimum over components) or [`NfaVariant::Pixel`] (the χ²(m) distance of all
//! components per feature cell).
//!
//! With an ignore mask (the "before" mode) ignored pixels are left out of the statistics, never
//! join a region or a BlockNFA count, and get the largest log10 NFA of the image, so they neither
//! appear in the map nor decide the image score.
//!
//! The thesis estimates the statistics on the image under test ([`Statistics::TestImage`]:
//! nothing to learn). [`Statistics::Training`] estimates the same statistics on normal training
//! images instead, for objects whose normality is not a self-similar texture.

pub mod cnn;
pub mod fft;
pub mod gabor;
pub mod pca;

use std::path::PathBuf;
use std::sync::OnceLock;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use vigil_backbones::{Backbone, BackboneKind};
use vigil_core::{
    ChannelMode, Detector, FitContext, Image, ImageSource, Map, Mask, Result, ScoreOutput, TensorBag,
    ThresholdKind, VigilError,
};
use vigil_nfa::block::BlockTest;
pub use vigil_nfa::region::Growing;
use vigil_nfa::region::RegionTest;
use vigil_nfa::tails::log10_chi2_sf;

use crate::cnn::{FeatureGrid, FeatureMoments, FeaturePca};
use crate::fft::{KernelSpectra, PaddedPlane};
use crate::pca::{PatchMoments, PatchPca};

/// Pyramid levels stop before either side would drop below this many pixels: smaller levels
/// hold too few samples for second-order statistics.
pub const MIN_LEVEL_SIDE: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Feature {
    /// s×s patches projected on their m leading principal directions (filters adapted to the data).
    Pca,
    /// A fixed Gabor bank (responses correlated, but treated as independent as in the thesis).
    Gabor,
    /// Pretrained CNN features at stride 4, decorrelated by PCA (the author's code; see [`cnn`]).
    Cnn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Statistics {
    /// The thesis: PCA basis and feature mean/variance from the image under test itself.
    TestImage,
    /// Basis and mean/variance estimated once on the normal training images.
    Training,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NfaVariant {
    /// NFA(x) = H·W · P[χ²(m) > d²(x)].
    Pixel,
    /// Concentrations of pixels with P[χ²(m) > d²] < p in w×w windows (binomial tail).
    Block,
    /// 4-connected regions of one component's χ²(1) distances, tested as a whole (CNN features only).
    Region,
}

/// Every parameter of the method; the defaults are the thesis's (Sec. 3.4, L731).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AcontrarioSettings {
    pub feature: Feature,
    pub statistics: Statistics,
    pub nfa: NfaVariant,
    /// Pyramid levels, each half the size of the previous one.
    pub scales: usize,
    /// Patch side s for patch PCA (odd).
    pub patch_size: usize,
    /// Principal components m kept for patch PCA.
    pub components: usize,
    /// Gabor filter sizes (odd); the bank has sizes × orientations × 2 phases filters.
    pub gabor_sizes: Vec<usize>,
    pub gabor_orientations: usize,
    /// BlockNFA window side w.
    pub block_window: usize,
    pub block_stride: usize,
    /// BlockNFA candidate probability p.
    pub block_p: f64,
    /// Also count channels × scales in the number of tests. The thesis takes the minimum over
    /// them without counting them, so its NFA bound holds per channel and scale; with this on,
    /// the expected number of false detections per image is bounded as a whole.
    pub count_channels_and_scales: bool,
    /// CNN features: the backbone.
    pub backbone: BackboneKind,
    /// CNN features: its weights file; `None`: the shipped weights (`vigil_backbones::default_weights_path`).
    pub weights: Option<PathBuf>,
    /// CNN features: seeded random weights instead (tests); overrides `weights`.
    pub random_weights_seed: Option<u64>,
    /// CNN features: layers to tap, concatenated; empty: [`cnn::default_layers`] of the backbone.
    pub layers: Vec<String>,
    /// CNN features: the side of the square network input (the reference's 256); 0 keeps the
    /// image's own size.
    pub cnn_input: usize,
    /// CNN features: PCA components kept (the reference's 35).
    pub cnn_components: usize,
    /// RegionNFA: pixels with a χ²(1) distance below this never join a region (the reference's 0.5).
    pub region_threshold: f64,
    /// RegionNFA: how regions grow (the reference's flood fill or the thesis' NFA-lowering rule).
    pub growing: Growing,
    /// RegionNFA: the receptive-field factor s̃; `None`: 3 × the feature stride (the reference's 12).
    pub receptive_field: Option<usize>,
}

impl Default for AcontrarioSettings {
    fn default() -> Self {
        AcontrarioSettings {
            feature: Feature::Pca,
            statistics: Statistics::TestImage,
            nfa: NfaVariant::Pixel,
            scales: 4,
            patch_size: 17,
            components: 45,
            gabor_sizes: vec![7, 15, 23, 31],
            gabor_orientations: 9,
            block_window: 51,
            block_stride: 10,
            block_p: 0.01,
            count_channels_and_scales: false,
            backbone: BackboneKind::MobileNetV2,
            weights: None,
            random_weights_seed: None,
            layers: Vec::new(),
            cnn_input: 256,
            cnn_components: 35,
            region_threshold: 0.5,
            growing: Growing::Reference,
            receptive_field: None,
        }
    }
}

impl AcontrarioSettings {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(VigilError::Config(format!("acontrario: {m}")));
        if self.scales == 0 {
            return bad("scales must be at least 1".into());
        }
        if self.patch_size < 3 || self.patch_size.is_multiple_of(2) {
            return bad(format!("patch_size must be odd and at least 3, got {}", self.patch_size));
        }
        if self.components == 0 || self.components > self.patch_size * self.patch_size {
            return bad(format!(
                "components must lie in 1..={} for {}x{} patches, got {}",
                self.patch_size * self.patch_size,
                self.patch_size,
                self.patch_size,
                self.components
            ));
        }
        if self.gabor_sizes.is_empty() || self.gabor_sizes.iter().any(|&s| s < 3 || s.is_multiple_of(2)) {
            return bad(format!("gabor_sizes must be odd sizes of at least 3, got {:?}", self.gabor_sizes));
        }
        if self.gabor_orientations == 0 {
            return bad("gabor_orientations must be at least 1".into());
        }
        if self.block_window == 0 || self.block_stride == 0 {
            return bad("block_window and block_stride must be positive".into());
        }
        if !(self.block_p > 0.0 && self.block_p < 1.0) {
            return bad(format!("block_p must lie in (0, 1), got {}", self.block_p));
        }
        match (self.feature, self.nfa) {
            (Feature::Cnn, NfaVariant::Block) => {
                return bad("CNN features take nfa=pixel or nfa=region".into())
            }
            (Feature::Pca | Feature::Gabor, NfaVariant::Region) => {
                return bad(
                    "nfa=region needs feature=cnn (the thesis defines RegionNFA on CNN features)".into()
                )
            }
            _ => {}
        }
        if self.cnn_components == 0 {
            return bad("cnn_components must be at least 1".into());
        }
        if self.feature == Feature::Cnn && self.cnn_input != 0 && self.cnn_input < 32 {
            return bad(format!(
                "cnn_input must be 0 (the image's size) or at least 32, got {}",
                self.cnn_input
            ));
        }
        if !(self.region_threshold > 0.0 && self.region_threshold.is_finite()) {
            return bad(format!("region_threshold must be positive, got {}", self.region_threshold));
        }
        if self.receptive_field == Some(0) {
            return bad("receptive_field must be at least 1".into());
        }
        Ok(())
    }

    /// Degrees of freedom of the distance: the number of features per pixel and channel.
    pub fn dof(&self) -> usize {
        match self.feature {
            Feature::Pca => self.components,
            Feature::Gabor => self.gabor_sizes.len() * self.gabor_orientations * 2,
            Feature::Cnn => self.cnn_components,
        }
    }

    /// The CNN layers to tap: `layers`, or the backbone's defaults.
    pub fn cnn_layers(&self) -> Vec<String> {
        if self.layers.is_empty() {
            cnn::default_layers(self.backbone)
        } else {
            self.layers.clone()
        }
    }

    /// The BlockNFA independence factor s: the patch size, or for the Gabor bank (whose filters
    /// differ in size and are combined in one distance) the mean filter size, rounded.
    pub fn independence(&self) -> usize {
        match self.feature {
            Feature::Pca => self.patch_size,
            Feature::Gabor => {
                let n = self.gabor_sizes.len();
                (self.gabor_sizes.iter().sum::<usize>() + n / 2) / n
            }
            Feature::Cnn => self.receptive_field.unwrap_or(12),
        }
    }
}

/// Feature statistics of one channel at one pyramid level.
#[derive(Clone, Debug, PartialEq)]
enum ChannelModel {
    Pca(PatchPca),
    Gabor { means: Vec<f64>, variances: Vec<f64> },
}

/// What `fit` learns in [`Statistics::Training`] mode: models[level][channel].
#[derive(Clone, Debug, PartialEq)]
struct TrainedModel {
    channels: usize,
    models: Vec<Vec<ChannelModel>>,
}

/// One pyramid level: planes per channel and the ignore flags at that resolution.
struct Level {
    width: usize,
    height: usize,
    planes: Vec<Vec<f64>>,
    ignore: Option<Vec<bool>>,
}

/// The CNN backbone, opened on first use so that building a detector from settings cannot fail.
#[derive(Clone, Default)]
struct LazyBackbone(OnceLock<Backbone>);

impl std::fmt::Debug for LazyBackbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() { "backbone (open)" } else { "backbone (not opened)" })
    }
}

#[derive(Clone, Debug)]
pub struct AcontrarioDetector {
    settings: AcontrarioSettings,
    gabor_radius: usize,
    gabor_bank: Vec<Vec<f64>>,
    trained: Option<TrainedModel>,
    /// CNN features with training statistics: the PCA learned by `fit`.
    cnn_trained: Option<FeaturePca>,
    backbone: LazyBackbone,
}

impl AcontrarioDetector {
    pub fn new(settings: AcontrarioSettings) -> Self {
        let (gabor_radius, gabor_bank) = match settings.feature {
            Feature::Gabor => gabor::bank(&settings.gabor_sizes, settings.gabor_orientations),
            Feature::Pca | Feature::Cnn => (0, Vec::new()),
        };
        AcontrarioDetector {
            settings,
            gabor_radius,
            gabor_bank,
            trained: None,
            cnn_trained: None,
            backbone: LazyBackbone::default(),
        }
    }

    /// Rebuilds a detector from [`Detector::settings`] and [`Detector::state`].
    pub fn load(settings: &serde_json::Value, state: &TensorBag) -> Result<Self> {
        let settings: AcontrarioSettings = serde_json::from_value(settings.clone())
            .map_err(|e| VigilError::Config(format!("acontrario settings: {e}")))?;
        settings.validate()?;
        let mut detector = AcontrarioDetector::new(settings);
        match (detector.settings.statistics, detector.settings.feature) {
            (Statistics::TestImage, _) => {}
            (Statistics::Training, Feature::Cnn) => detector.cnn_trained = Some(decode_cnn_state(state)?),
            (Statistics::Training, _) => detector.trained = Some(detector.decode_state(state)?),
        }
        Ok(detector)
    }

    fn backbone(&self) -> Result<&Backbone> {
        if let Some(backbone) = self.backbone.0.get() {
            return Ok(backbone);
        }
        let s = &self.settings;
        let backbone = Backbone::open(s.backbone, s.weights.as_deref(), s.random_weights_seed)?;
        Ok(self.backbone.0.get_or_init(|| backbone))
    }

    /// The network input size for an image: `cnn_input` square, or the image's own size.
    fn cnn_input_size(&self, image: &Image) -> (usize, usize) {
        match self.settings.cnn_input {
            0 => (image.width, image.height),
            side => (side, side),
        }
    }

    fn cnn_features(&self, image: &Image, ignore: Option<&Mask>) -> Result<FeatureGrid> {
        cnn::extract(self.backbone()?, &self.settings.cnn_layers(), image, self.cnn_input_size(image), ignore)
    }

    /// log10 NFA at the image's size from CNN features (Pixel or Region NFA).
    fn cnn_log10_nfa(&self, image: &Image, ignore: Option<&Mask>) -> Result<Map> {
        let grid = self.cnn_features(image, ignore)?;
        let own;
        let pca = match (self.settings.statistics, &self.cnn_trained) {
            (Statistics::Training, Some(pca)) => pca,
            (Statistics::Training, None) => {
                return Err(VigilError::Model(
                    "acontrario with training statistics must be fitted (or loaded) before scoring".into(),
                ))
            }
            (Statistics::TestImage, _) => {
                let mut moments = FeatureMoments::new(grid.channels);
                moments.add(&grid)?;
                own = moments.pca(self.settings.cnn_components)?;
                &own
            }
        };
        let distances = pca.distances(&grid)?;
        let (gw, gh) = (grid.width, grid.height);
        let ignored = |p: usize| grid.ignore.as_ref().is_some_and(|m| m[p]);
        match self.settings.nfa {
            NfaVariant::Pixel => {
                // one χ²(m) test per feature cell: the cells, not the up-sampled pixels, are the tests
                let dof = distances.len() as f64;
                let tests = ((gw * gh) as f64).log10();
                let values = (0..gw * gh)
                    .map(|p| {
                        let log10_pfa = if ignored(p) {
                            0.0
                        } else {
                            log10_chi2_sf(distances.iter().map(|d| d[p]).sum(), dof)
                        };
                        (tests + log10_pfa) as f32
                    })
                    .collect();
                Ok(Map::new(gw, gh, values)?.resize_bilinear(image.width, image.height))
            }
            NfaVariant::Region => {
                let (w, h) = self.cnn_input_size(image);
                let test = RegionTest {
                    threshold: self.settings.region_threshold,
                    receptive_field: self.settings.receptive_field.unwrap_or(3 * grid.stride) as f64,
                    growing: self.settings.growing,
                };
                let excluded = ignore.map(|m| m.resize_nearest(w, h).data);
                let per_component = distances
                    .par_iter()
                    .map(|d| {
                        let up = cnn::resize_bicubic_aligned(d, gw, gh, w, h);
                        test.region_map(&up, w, h, excluded.as_deref())
                    })
                    .collect::<Result<Vec<_>>>()?;
                let mut combined = vec![f64::INFINITY; w * h];
                for map in &per_component {
                    combined.iter_mut().zip(map).for_each(|(a, b)| *a = a.min(*b));
                }
                // pixels in no region of any component get the largest log NFA seen, and at least
                // 0, as the reference's max over its zero-initialised map
                let fill = combined.iter().filter(|v| v.is_finite()).fold(0f64, |a, &b| a.max(b));
                let values = combined.iter().map(|&v| if v.is_finite() { v } else { fill } as f32).collect();
                Ok(Map::new(w, h, values)?.resize_nearest(image.width, image.height))
            }
            NfaVariant::Block => {
                Err(VigilError::Config("acontrario: CNN features take nfa=pixel or nfa=region".into()))
            }
        }
    }

    fn decode_state(&self, state: &TensorBag) -> Result<TrainedModel> {
        let count = |name: &str| -> Result<usize> {
            match state.i64(name)?.as_slice() {
                [v] if *v > 0 => Ok(*v as usize),
                other => Err(VigilError::Model(format!("acontrario state: '{name}' is {other:?}"))),
            }
        };
        let channels = count("channels")?;
        let levels = count("levels")?;
        let m = self.settings.dof();
        let n = self.settings.patch_size * self.settings.patch_size;
        let checked = |name: String, len: usize| -> Result<Vec<f64>> {
            let v = state.f64(&name)?;
            if v.len() != len {
                return Err(VigilError::Model(format!(
                    "acontrario state: '{name}' holds {} values, expected {len} (do the settings match the model?)",
                    v.len()
                )));
            }
            Ok(v)
        };
        let mut models = Vec::with_capacity(levels);
        for level in 0..levels {
            let mut per_channel = Vec::with_capacity(channels);
            for c in 0..channels {
                let key = format!("level{level}.channel{c}");
                per_channel.push(match self.settings.feature {
                    Feature::Cnn => {
                        return Err(VigilError::Model("acontrario state: CNN models have no pyramid".into()))
                    }
                    Feature::Pca => {
                        let basis = checked(format!("{key}.basis"), m * n)?;
                        ChannelModel::Pca(PatchPca {
                            size: self.settings.patch_size,
                            basis: basis.chunks(n).map(|r| r.to_vec()).collect(),
                            mean_patch: checked(format!("{key}.mean_patch"), n)?,
                            variances: checked(format!("{key}.variances"), m)?,
                        })
                    }
                    Feature::Gabor => ChannelModel::Gabor {
                        means: checked(format!("{key}.means"), m)?,
                        variances: checked(format!("{key}.variances"), m)?,
                    },
                });
            }
            models.push(per_channel);
        }
        Ok(TrainedModel { channels, models })
    }

    /// The image pyramid: 2×2 averaging per level; a pixel of a coarser level is ignored when any
    /// of the four pixels it averages is.
    fn pyramid(&self, image: &Image, ignore: Option<&Mask>) -> Vec<Level> {
        let planes =
            (0..image.channels).map(|c| image.channel(c).iter().map(|&v| v as f64).collect()).collect();
        let mut levels = vec![Level {
            width: image.width,
            height: image.height,
            planes,
            ignore: ignore.map(|m| m.data.clone()),
        }];
        while levels.len() < self.settings.scales {
            let prev = levels.last().expect("the pyramid starts with the image");
            let (w, h) = (prev.width / 2, prev.height / 2);
            if w.min(h) < MIN_LEVEL_SIDE {
                break;
            }
            let pw = prev.width;
            let planes = prev
                .planes
                .iter()
                .map(|p| {
                    let mut out = Vec::with_capacity(w * h);
                    for y in 0..h {
                        for x in 0..w {
                            let i = 2 * y * pw + 2 * x;
                            out.push(0.25 * (p[i] + p[i + 1] + p[i + pw] + p[i + pw + 1]));
                        }
                    }
                    out
                })
                .collect();
            let ignore = prev.ignore.as_ref().map(|m| {
                let mut out = Vec::with_capacity(w * h);
                for y in 0..h {
                    for x in 0..w {
                        let i = 2 * y * pw + 2 * x;
                        out.push(m[i] || m[i + 1] || m[i + pw] || m[i + pw + 1]);
                    }
                }
                out
            });
            levels.push(Level { width: w, height: h, planes, ignore });
        }
        levels
    }

    fn check_image(&self, image: &Image, ignore: Option<&Mask>) -> Result<()> {
        if image.width < MIN_LEVEL_SIDE || image.height < MIN_LEVEL_SIDE {
            return Err(VigilError::invalid(format!(
                "acontrario needs images of at least {MIN_LEVEL_SIDE}x{MIN_LEVEL_SIDE} pixels, got {}x{}",
                image.width, image.height
            )));
        }
        if image.data.iter().any(|v| !v.is_finite()) {
            return Err(VigilError::invalid("image holds a non-finite sample"));
        }
        if let Some(m) = ignore {
            if (m.width, m.height) != (image.width, image.height) {
                return Err(VigilError::invalid(format!(
                    "ignore mask is {}x{} but the image is {}x{}",
                    m.width, m.height, image.width, image.height
                )));
            }
        }
        Ok(())
    }

    /// Per-pixel squared Mahalanobis distance of one channel at one level.
    /// `gabor` is the Gabor bank's spectra for this plane size (Gabor feature only).
    fn distance(
        &self,
        plane: &[f64],
        width: usize,
        height: usize,
        model: &ChannelModel,
        gabor: Option<&KernelSpectra>,
    ) -> Vec<f64> {
        let pca_spectra;
        let (padded, spectra, means, variances) = match model {
            ChannelModel::Pca(pca) => {
                let means: Vec<f64> = pca.basis.iter().map(|v| dot(v, &pca.mean_patch)).collect();
                let radius = pca.size / 2;
                pca_spectra = KernelSpectra::new(&pca.basis, radius, width, height);
                (PaddedPlane::new(plane, width, height, radius), &pca_spectra, means, &pca.variances)
            }
            ChannelModel::Gabor { means, variances } => {
                let padded = PaddedPlane::new(plane, width, height, self.gabor_radius);
                (padded, gabor.expect("Gabor spectra are prepared for every level"), means.clone(), variances)
            }
        };
        let inverse = inverse_variances(variances);
        let mut d2 = vec![0f64; width * height];
        spectra.correlate(&padded, |j, tile| {
            for y in 0..tile.height {
                let row = &mut d2[(tile.y0 + y) * width + tile.x0..][..tile.width];
                for (acc, v) in row.iter_mut().zip(&tile.values[y * tile.width..][..tile.width]) {
                    *acc += (v - means[j]).powi(2) * inverse[j];
                }
            }
        });
        d2
    }

    /// Statistics of one channel at one level estimated on that same plane (the thesis's mode).
    fn own_statistics(
        &self,
        level: &Level,
        channel: usize,
        gabor: Option<&KernelSpectra>,
    ) -> Result<ChannelModel> {
        let mut acc = self.accumulator();
        acc.add(level, channel, gabor);
        acc.finish(self.settings.components)
    }

    /// The Gabor bank's spectra for each level's size, shared by its channels (None for PCA).
    fn gabor_spectra(&self, levels: &[Level]) -> Vec<Option<KernelSpectra>> {
        levels
            .par_iter()
            .map(|level| {
                (self.settings.feature == Feature::Gabor).then(|| {
                    KernelSpectra::new(&self.gabor_bank, self.gabor_radius, level.width, level.height)
                })
            })
            .collect()
    }

    fn accumulator(&self) -> Accumulator {
        match self.settings.feature {
            Feature::Pca | Feature::Cnn => Accumulator::Pca(PatchMoments::new(self.settings.patch_size)),
            Feature::Gabor => Accumulator::Gabor { count: 0.0, sums: vec![[0.0; 2]; self.gabor_bank.len()] },
        }
    }

    /// log10 NFA of one channel at one level, at that level's resolution.
    fn channel_log10_nfa(
        &self,
        level: &Level,
        channel: usize,
        model: &ChannelModel,
        gabor: Option<&KernelSpectra>,
        extra_tests: f64,
    ) -> Result<Vec<f64>> {
        let (w, h) = (level.width, level.height);
        let d2 = self.distance(&level.planes[channel], w, h, model, gabor);
        let dof = self.settings.dof() as f64;
        // ignored pixels (before mode) have probability 1: never a detection, never a BlockNFA candidate
        let ignored = |i: usize| level.ignore.as_ref().is_some_and(|m| m[i]);
        let log10_pfa: Vec<f64> = d2
            .iter()
            .enumerate()
            .map(|(i, &d)| if ignored(i) { 0.0 } else { log10_chi2_sf(d, dof) })
            .collect();
        let mut nfa = match self.settings.nfa {
            NfaVariant::Pixel => {
                let tests = ((w * h) as f64).log10();
                log10_pfa.iter().map(|p| tests + p).collect()
            }
            NfaVariant::Region => {
                return Err(VigilError::Config("acontrario: nfa=region needs feature=cnn".into()))
            }
            NfaVariant::Block => BlockTest {
                window: self.settings.block_window,
                stride: self.settings.block_stride,
                p: self.settings.block_p,
                independence: self.settings.independence(),
            }
            .log10_nfa_from_log10_pfa(&log10_pfa, w, h)?,
        };
        nfa.iter_mut().for_each(|v| *v += extra_tests);
        Ok(nfa)
    }

    /// log10 NFA at the image's size from the pyramid features (Patch-PCA or Gabor).
    fn pyramid_log10_nfa(&self, image: &Image, ignore: Option<&Mask>) -> Result<Map> {
        let trained = match (self.settings.statistics, &self.trained) {
            (Statistics::TestImage, _) => None,
            (Statistics::Training, Some(t)) => {
                if t.channels != image.channels {
                    return Err(VigilError::invalid(format!(
                        "image has {} channels, the model was trained on {}",
                        image.channels, t.channels
                    )));
                }
                Some(t)
            }
            (Statistics::Training, None) => {
                return Err(VigilError::Model(
                    "acontrario with training statistics must be fitted (or loaded) before scoring".into(),
                ))
            }
        };
        let mut levels = self.pyramid(image, ignore);
        if let Some(t) = trained {
            levels.truncate(t.models.len());
        }
        let extra_tests = if self.settings.count_channels_and_scales {
            ((image.channels * levels.len()) as f64).log10()
        } else {
            0.0
        };
        let gabor = self.gabor_spectra(&levels);
        let tasks: Vec<(usize, usize)> =
            (0..levels.len()).flat_map(|l| (0..image.channels).map(move |c| (l, c))).collect();
        let per_task = tasks
            .par_iter()
            .map(|&(l, c)| {
                let level = &levels[l];
                let own;
                let model = match trained {
                    Some(t) => &t.models[l][c],
                    None => {
                        own = self.own_statistics(level, c, gabor[l].as_ref())?;
                        &own
                    }
                };
                self.channel_log10_nfa(level, c, model, gabor[l].as_ref(), extra_tests)
            })
            .collect::<Result<Vec<_>>>()?;

        let mut combined = vec![f32::INFINITY; image.width * image.height];
        for (l, level) in levels.iter().enumerate() {
            let mut per_level = vec![f64::INFINITY; level.width * level.height];
            for (task, nfa) in tasks.iter().zip(&per_task) {
                if task.0 == l {
                    per_level.iter_mut().zip(nfa).for_each(|(a, b)| *a = a.min(*b));
                }
            }
            let map = Map::new(level.width, level.height, per_level.iter().map(|&v| v as f32).collect())?
                .resize_bilinear(image.width, image.height);
            combined.iter_mut().zip(&map.data).for_each(|(a, b)| *a = a.min(*b));
        }
        Map::new(image.width, image.height, combined)
    }

    /// Training statistics of CNN features: the PCA of every training cell outside the ignore mask.
    fn fit_cnn(&mut self, train: &dyn ImageSource, ctx: &FitContext) -> Result<()> {
        let bar = ctx.show_progress.then(|| vigil_core::progress::bar(train.len() as u64, "acontrario"));
        let mut moments: Option<FeatureMoments> = None;
        for index in 0..train.len() {
            let in_file = |e: VigilError| VigilError::file(train.name(index), e.to_string());
            let image = train.load(index)?;
            let ignore = train.ignore_mask(index);
            self.check_image(&image, ignore.as_ref()).map_err(in_file)?;
            let grid = self.cnn_features(&image, ignore.as_ref()).map_err(in_file)?;
            moments.get_or_insert_with(|| FeatureMoments::new(grid.channels)).add(&grid).map_err(in_file)?;
            if let Some(bar) = &bar {
                bar.inc(1);
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let moments = moments.expect("the training set is not empty");
        self.cnn_trained = Some(moments.pca(self.settings.cnn_components)?);
        Ok(())
    }
}

/// Gives ignored pixels the largest log10 NFA of the image (at least 0): they are never a detection
/// and never the image score.
fn silence_ignored(log10_nfa: &mut Map, ignore: Option<&Mask>) {
    let Some(mask) = ignore else {
        return;
    };
    let top = log10_nfa.data.iter().zip(&mask.data).filter(|(_, &i)| !i).fold(0f32, |a, (&v, _)| a.max(v));
    log10_nfa.data.iter_mut().zip(&mask.data).filter(|(_, &i)| i).for_each(|(v, _)| *v = top);
}

fn decode_cnn_state(state: &TensorBag) -> Result<FeaturePca> {
    let mean = state.f64("cnn.mean")?;
    let variances = state.f64("cnn.variances")?;
    let basis = state.f64("cnn.basis")?;
    let (c, m) = (mean.len(), variances.len());
    if c == 0 || m == 0 || basis.len() != m * c {
        return Err(VigilError::Model(format!(
            "acontrario state: CNN PCA of {m} components on {c} channels holds {} basis values",
            basis.len()
        )));
    }
    Ok(FeaturePca { mean, basis: basis.chunks(c).map(|r| r.to_vec()).collect(), variances })
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// 1/σ², with a floor on σ² so that a flat channel (zero variance, features equal to their mean
/// up to rounding) gives distance ≈ 0 instead of 0/0.
pub(crate) fn inverse_variances(variances: &[f64]) -> Vec<f64> {
    let largest = variances.iter().copied().fold(0.0, f64::max);
    let floor = (1e-10 * largest).max(1e-14);
    variances.iter().map(|&v| 1.0 / v.max(floor)).collect()
}

/// Running feature statistics of one channel at one level.
enum Accumulator {
    Pca(PatchMoments),
    /// Per filter: [Σ y, Σ y²] over the counted pixels.
    Gabor {
        count: f64,
        sums: Vec<[f64; 2]>,
    },
}

impl Accumulator {
    /// Adds one channel of one level; `gabor` is the bank's spectra for that level's size.
    fn add(&mut self, level: &Level, channel: usize, gabor: Option<&KernelSpectra>) {
        let (plane, width, height) = (&level.planes[channel], level.width, level.height);
        let ignore = level.ignore.as_deref();
        match self {
            Accumulator::Pca(moments) => {
                moments.add(&PaddedPlane::new(plane, width, height, moments.size / 2), ignore)
            }
            Accumulator::Gabor { count, sums } => {
                let spectra = gabor.expect("Gabor spectra are prepared for every level");
                let padded = PaddedPlane::new(plane, width, height, spectra.radius());
                spectra.correlate(&padded, |j, tile| {
                    for y in 0..tile.height {
                        for x in 0..tile.width {
                            let i = (tile.y0 + y) * width + tile.x0 + x;
                            if !ignore.is_some_and(|m| m[i]) {
                                let v = tile.values[y * tile.width + x];
                                sums[j][0] += v;
                                sums[j][1] += v * v;
                            }
                        }
                    }
                });
                *count += ignore.map_or(width * height, |m| m.iter().filter(|&&b| !b).count()) as f64;
            }
        }
    }

    fn finish(&self, components: usize) -> Result<ChannelModel> {
        match self {
            Accumulator::Pca(moments) => Ok(ChannelModel::Pca(moments.pca(components)?)),
            Accumulator::Gabor { count, sums } => {
                if *count < 2.0 {
                    return Err(VigilError::invalid(
                        "Gabor statistics need at least two pixels outside the ignore mask",
                    ));
                }
                let means: Vec<f64> = sums.iter().map(|s| s[0] / count).collect();
                let variances =
                    sums.iter().zip(&means).map(|(s, m)| (s[1] / count - m * m).max(0.0)).collect();
                Ok(ChannelModel::Gabor { means, variances })
            }
        }
    }
}

impl Detector for AcontrarioDetector {
    fn method(&self) -> &'static str {
        "acontrario"
    }

    fn channel_mode(&self) -> ChannelMode {
        ChannelMode::Native
    }

    fn fit(&mut self, train: &dyn ImageSource, ctx: &FitContext) -> Result<()> {
        self.settings.validate()?;
        if self.settings.statistics == Statistics::TestImage {
            // the thesis's mode estimates everything on each test image: nothing to learn
            return Ok(());
        }
        if train.is_empty() {
            return Err(VigilError::invalid("acontrario training statistics need at least one image"));
        }
        if self.settings.feature == Feature::Cnn {
            return self.fit_cnn(train, ctx);
        }
        let bar = ctx.show_progress.then(|| vigil_core::progress::bar(train.len() as u64, "acontrario"));
        let mut channels = None;
        // accumulators[level][channel]; a level is kept only if every training image reaches it
        let mut accumulators: Vec<Vec<Accumulator>> = Vec::new();
        let mut levels_in_all = usize::MAX;
        for index in 0..train.len() {
            let image = train.load(index)?;
            let ignore = train.ignore_mask(index);
            self.check_image(&image, ignore.as_ref())
                .map_err(|e| VigilError::file(train.name(index), e.to_string()))?;
            match channels {
                None => channels = Some(image.channels),
                Some(c) if c != image.channels => {
                    return Err(VigilError::file(
                        train.name(index),
                        format!("has {} channels, earlier training images have {c}", image.channels),
                    ))
                }
                Some(_) => {}
            }
            let levels = self.pyramid(&image, ignore.as_ref());
            levels_in_all = levels_in_all.min(levels.len());
            while accumulators.len() < levels.len() {
                accumulators.push((0..image.channels).map(|_| self.accumulator()).collect());
            }
            let gabor = self.gabor_spectra(&levels);
            accumulators
                .iter_mut()
                .zip(levels.iter().zip(&gabor))
                .flat_map(|(per_channel, (level, g))| {
                    per_channel.iter_mut().enumerate().map(move |(c, a)| (level, g, c, a))
                })
                .collect::<Vec<_>>()
                .into_par_iter()
                .for_each(|(level, g, c, acc)| acc.add(level, c, g.as_ref()));
            if let Some(bar) = &bar {
                bar.inc(1);
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        accumulators.truncate(levels_in_all);
        let components = self.settings.components;
        let models = accumulators
            .par_iter()
            .map(|per_channel| per_channel.iter().map(|a| a.finish(components)).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        self.trained = Some(TrainedModel { channels: channels.unwrap_or(0), models });
        Ok(())
    }

    fn score(&self, image: &Image, ignore: Option<&Mask>) -> Result<ScoreOutput> {
        self.settings.validate()?;
        self.check_image(image, ignore)?;
        let mut log10_nfa = match self.settings.feature {
            Feature::Cnn => self.cnn_log10_nfa(image, ignore)?,
            Feature::Pca | Feature::Gabor => self.pyramid_log10_nfa(image, ignore)?,
        };
        log10_nfa.check_finite("acontrario log10 NFA")?;
        silence_ignored(&mut log10_nfa, ignore);
        let map = Map::new(image.width, image.height, log10_nfa.data.iter().map(|v| -v).collect())?;
        let image_score = Some(map.max());
        Ok(ScoreOutput { map, image_score, log10_nfa: Some(log10_nfa) })
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).expect("plain settings always serialise")
    }

    fn state(&self) -> Result<TensorBag> {
        let mut bag = TensorBag::new();
        if let Some(pca) = &self.cnn_trained {
            let basis: Vec<f64> = pca.basis.iter().flatten().copied().collect();
            bag.put_f64("cnn.mean", &[pca.mean.len()], pca.mean.clone());
            bag.put_f64("cnn.basis", &[pca.basis.len(), pca.mean.len()], basis);
            bag.put_f64("cnn.variances", &[pca.variances.len()], pca.variances.clone());
        }
        let Some(trained) = &self.trained else {
            return Ok(bag);
        };
        bag.put_i64("channels", &[1], vec![trained.channels as i64]);
        bag.put_i64("levels", &[1], vec![trained.models.len() as i64]);
        for (l, per_channel) in trained.models.iter().enumerate() {
            for (c, model) in per_channel.iter().enumerate() {
                let key = format!("level{l}.channel{c}");
                match model {
                    ChannelModel::Pca(pca) => {
                        let n = pca.size * pca.size;
                        let basis: Vec<f64> = pca.basis.iter().flatten().copied().collect();
                        bag.put_f64(&format!("{key}.basis"), &[pca.basis.len(), n], basis);
                        bag.put_f64(&format!("{key}.mean_patch"), &[n], pca.mean_patch.clone());
                        bag.put_f64(
                            &format!("{key}.variances"),
                            &[pca.variances.len()],
                            pca.variances.clone(),
                        );
                    }
                    ChannelModel::Gabor { means, variances } => {
                        bag.put_f64(&format!("{key}.means"), &[means.len()], means.clone());
                        bag.put_f64(&format!("{key}.variances"), &[variances.len()], variances.clone());
                    }
                }
            }
        }
        Ok(bag)
    }

    fn default_threshold(&self) -> Option<ThresholdKind> {
        Some(ThresholdKind::Nfa { k: 0.0 })
    }

    /// Tiled test-image statistics: taken once from all tiles of the image (streamed, as training
    /// statistics are) instead of from each tile alone, so neighbouring tiles agree.
    fn with_statistics_of(&self, tiles: &dyn ImageSource) -> Result<Option<Box<dyn Detector>>> {
        if self.settings.statistics != Statistics::TestImage {
            return Ok(None);
        }
        let settings = AcontrarioSettings { statistics: Statistics::Training, ..self.settings.clone() };
        let mut whole_image = AcontrarioDetector::new(settings);
        whole_image.fit(tiles, &FitContext::default())?;
        Ok(Some(Box::new(whole_image)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_core::InMemorySource;

    #[test]
    fn defaults_are_the_thesis_parameters() {
        let s = AcontrarioSettings::default();
        assert_eq!((s.scales, s.patch_size, s.components), (4, 17, 45));
        assert_eq!((s.block_window, s.block_stride, s.block_p), (51, 10, 0.01));
        let gabor = AcontrarioSettings { feature: Feature::Gabor, ..s.clone() };
        assert_eq!(gabor.dof(), 72);
        assert_eq!((*gabor.gabor_sizes.first().unwrap(), *gabor.gabor_sizes.last().unwrap()), (7, 31));
        assert_eq!((s.independence(), gabor.independence()), (17, 19));
        s.validate().unwrap();
        // the settings travel through JSON unchanged, with kebab-case enum values
        let json = serde_json::to_value(&gabor).unwrap();
        assert_eq!(json["feature"], "gabor");
        assert_eq!(json["statistics"], "test-image");
        assert_eq!(serde_json::from_value::<AcontrarioSettings>(json).unwrap(), gabor);
    }

    /// A 96x96 noise texture with an optional dark 10x10 spot at (x0, y0).
    fn textured(seed: u64, spot: Option<(usize, usize)>) -> Image {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut data: Vec<f32> = (0..3 * 96 * 96)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                0.5 + 0.08 * (((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5)
            })
            .collect();
        if let Some((x0, y0)) = spot {
            for c in 0..3 {
                for y in y0..y0 + 10 {
                    for x in x0..x0 + 10 {
                        data[c * 96 * 96 + y * 96 + x] = 0.1;
                    }
                }
            }
        }
        Image::new(96, 96, 3, data).unwrap()
    }

    fn cnn(nfa: NfaVariant, growing: Growing, statistics: Statistics) -> AcontrarioDetector {
        AcontrarioDetector::new(AcontrarioSettings {
            feature: Feature::Cnn,
            nfa,
            growing,
            statistics,
            random_weights_seed: Some(1),
            cnn_input: 96,
            ..AcontrarioSettings::default()
        })
    }

    #[test]
    fn cnn_region_nfa_finds_a_spot_and_ignores_it_when_masked() {
        let det = cnn(NfaVariant::Region, Growing::Thesis, Statistics::TestImage);
        let image = textured(1, Some((60, 30)));
        let out = det.score(&image, None).unwrap();
        let nfa = out.log10_nfa.unwrap();
        assert!(nfa.get(35, 65) < 0.0, "the spot is detected: {}", nfa.get(35, 65));
        let (y, x) = (0..96 * 96)
            .map(|i| (i / 96, i % 96))
            .min_by(|a, b| nfa.get(a.0, a.1).total_cmp(&nfa.get(b.0, b.1)))
            .unwrap();
        assert!(
            (20..50).contains(&y) && (50..80).contains(&x),
            "the strongest detection is at the spot: ({x}, {y})"
        );
        // before mode: the spot's area is out of the statistics, the regions and the image score
        let mut ignore = Mask::empty(96, 96);
        for y in 20..50 {
            for x in 50..80 {
                ignore.data[y * 96 + x] = true;
            }
        }
        let masked = det.score(&image, Some(&ignore)).unwrap();
        let masked_nfa = masked.log10_nfa.unwrap();
        assert!(masked_nfa.get(35, 65) >= 0.0);
        assert!(masked.image_score.unwrap() < out.image_score.unwrap());
        assert!(ignore
            .data
            .iter()
            .zip(&masked.map.data)
            .filter(|(i, _)| **i)
            .all(|(_, v)| *v <= masked.map.max()));
    }

    #[test]
    fn cnn_training_statistics_round_trip_through_the_state() {
        for nfa in [NfaVariant::Pixel, NfaVariant::Region] {
            let mut det = cnn(nfa, Growing::Reference, Statistics::Training);
            let train = InMemorySource::new((0..4).map(|i| textured(10 + i, None)).collect());
            det.fit(&train, &FitContext::default()).unwrap();
            let image = textured(3, Some((20, 50)));
            let first = det.score(&image, None).unwrap();
            let loaded = AcontrarioDetector::load(&det.settings(), &det.state().unwrap()).unwrap();
            let second = loaded.score(&image, None).unwrap();
            assert_eq!(first.map.data, second.map.data, "{nfa:?}");
            assert!(first.log10_nfa.unwrap().get(55, 25) < 0.0, "{nfa:?}: the spot is detected");
        }
        let unfitted = cnn(NfaVariant::Pixel, Growing::Reference, Statistics::Training);
        assert!(unfitted.score(&textured(1, None), None).is_err());
    }

    #[test]
    fn resnet50_from_a_weights_file_taps_the_reference_conv3() {
        // The reference's features: ResNet-50 layer1[0].conv3 (256 channels, stride 4) from the
        // user's weights file, here a seeded random state saved as safetensors.
        let path = std::env::temp_dir()
            .join(format!("vigil-acontrario-resnet50-{}.safetensors", std::process::id()));
        vigil_backbones::write_state(&Backbone::random_state(BackboneKind::ResNet50, 4), &path).unwrap();
        let json = serde_json::json!({"feature": "cnn", "nfa": "region", "backbone": "resnet50",
            "weights": path, "layers": ["layer1.0.conv3"], "cnn_input": 96});
        let settings: AcontrarioSettings = serde_json::from_value(json).unwrap();
        settings.validate().unwrap();
        assert_eq!(cnn::default_layers(BackboneKind::ResNet50), settings.layers, "the default tap");
        let det = AcontrarioDetector::new(settings);
        let image = textured(1, Some((60, 30)));
        let grid = cnn::extract(det.backbone().unwrap(), &det.settings.cnn_layers(), &image, (96, 96), None);
        let out = det.score(&image, None);
        std::fs::remove_file(&path).unwrap();
        let grid = grid.unwrap();
        assert_eq!((grid.channels, grid.stride, grid.width, grid.height), (256, 4, 24, 24));
        // before its batch norm and ReLU the tap takes both signs
        assert!(grid.data.iter().any(|&v| v < 0.0) && grid.data.iter().any(|&v| v > 0.0));
        let nfa = out.unwrap().log10_nfa.unwrap();
        assert!(nfa.get(35, 65) < 0.0, "the spot is detected: {}", nfa.get(35, 65));
    }

    #[test]
    fn region_nfa_needs_cnn_features() {
        let bad = AcontrarioSettings { nfa: NfaVariant::Region, ..AcontrarioSettings::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("feature=cnn"));
        let bad = AcontrarioSettings {
            feature: Feature::Cnn,
            nfa: NfaVariant::Block,
            ..AcontrarioSettings::default()
        };
        assert!(bad.validate().is_err());
        let json = serde_json::json!({"feature": "cnn", "nfa": "region", "growing": "thesis"});
        let s: AcontrarioSettings = serde_json::from_value(json).unwrap();
        assert_eq!((s.cnn_components, s.cnn_input, s.region_threshold), (35, 256, 0.5));
        s.validate().unwrap();
    }

    #[test]
    fn pyramid_halves_and_propagates_the_ignore_mask() {
        let det = AcontrarioDetector::new(AcontrarioSettings::default());
        let image = Image::new(70, 33, 1, (0..70 * 33).map(|i| (i % 7) as f32 / 7.0).collect()).unwrap();
        let mut ignore = Mask::empty(70, 33);
        ignore.data[0] = true;
        let levels = det.pyramid(&image, Some(&ignore));
        let sizes: Vec<(usize, usize)> = levels.iter().map(|l| (l.width, l.height)).collect();
        // 33 → 16 → 8 → (4 is below the minimum side)
        assert_eq!(sizes, vec![(70, 33), (35, 16), (17, 8)]);
        let p0 = image.channel(0);
        let expected = 0.25 * (p0[0] + p0[1] + p0[70] + p0[71]) as f64;
        assert!((levels[1].planes[0][0] - expected).abs() < 1e-12);
        assert_eq!(levels[2].ignore.as_ref().unwrap().iter().filter(|&&b| b).count(), 1);
        assert!(levels[2].ignore.as_ref().unwrap()[0]);
    }
}
