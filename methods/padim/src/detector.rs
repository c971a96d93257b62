//! The PaDiM detector: settings, streamed fit, Mahalanobis scoring, state.

use std::path::PathBuf;

use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use vigil_backbones::{Backbone, BackboneKind, FeatureMap};
use vigil_core::{
    for_each_batch, BlurBorder, ChannelMode, Detector, FitContext, Image, ImageSource, Map, Mask, Result,
    ScoreOutput, TensorBag, VigilError,
};

use crate::gaussian::{mahalanobis, pack_precision, packed_len, unpack_precision, GaussianAccumulator};

const MEAN_TENSOR: &str = "mean";
const INV_COV_TENSOR: &str = "inv_covariance";
const CHANNELS_TENSOR: &str = "channel_index";
/// 1 where a position had training samples, 0 where the ignore mask hid it in every image
/// (absent in models fitted before it existed: every position had samples then).
const SAMPLED_TENSOR: &str = "sampled_positions";

/// PaDiM's settings. Every field has a default, so `{}` is a valid configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PadimSettings {
    /// Feature extractor.
    pub backbone: BackboneKind,
    /// Weights file (`.safetensors`, `.pth`); `None`: the backbone's shipped weights.
    pub weights: Option<PathBuf>,
    /// Seeded random weights instead of pretrained ones (tests, ablations); overrides `weights`.
    pub random_weights_seed: Option<u64>,
    /// Layers to tap, the first one setting the position grid; empty: [`default_layers`].
    pub layers: Vec<String>,
    /// Channels kept from the concatenated layers, drawn at random with the fit seed (the
    /// paper's d); `None`: [`default_channels`].
    pub channels: Option<usize>,
    /// Side of the square network input in pixels; images are resized to it.
    pub input_size: usize,
    /// Added to each covariance diagonal before inversion (the paper's 0.01).
    pub eps: f64,
    /// Gaussian smoothing of the anomaly map, in input-size pixels.
    pub sigma: f32,
    /// The smoothing's border: `whole-sample` mirror (anomalib, the default) or `half-sample`
    /// (scipy, as the original code).
    pub blur_border: BlurBorder,
    /// Images per backbone pass and per statistics update.
    pub batch_size: usize,
}

impl Default for PadimSettings {
    fn default() -> Self {
        PadimSettings {
            backbone: BackboneKind::MobileNetV2,
            weights: None,
            random_weights_seed: None,
            layers: Vec::new(),
            channels: None,
            input_size: 256,
            eps: 0.01,
            sigma: 4.0,
            blur_border: BlurBorder::WholeSample,
            batch_size: 16,
        }
    }
}

/// Default taps: the paper's first three ResNet stages; for MobileNetV2 and the EfficientNets
/// the stride-8 and stride-16 blocks (their stride-4 blocks have few channels and add little).
pub fn default_layers(kind: BackboneKind) -> Vec<String> {
    let names: &[&str] = match kind {
        BackboneKind::MobileNetV2 => &["features.6", "features.13"],
        BackboneKind::EfficientNetLite0 => &["_blocks.4", "_blocks.10"],
        BackboneKind::EfficientNetB5 => &["features.3.4", "features.5.6"],
        BackboneKind::ResNet18 | BackboneKind::ResNet50 | BackboneKind::WideResNet50 => {
            &["layer1", "layer2", "layer3"]
        }
    };
    names.iter().map(|s| s.to_string()).collect()
}

/// Default d: the paper's 100 (ResNet-18) and 550 (WRN-50); the mobile networks' default
/// taps have few enough channels (128, 152) to keep all.
pub fn default_channels(kind: BackboneKind, total: usize) -> usize {
    match kind {
        BackboneKind::ResNet18 => 100,
        BackboneKind::ResNet50 | BackboneKind::WideResNet50 => 550,
        BackboneKind::MobileNetV2 | BackboneKind::EfficientNetLite0 | BackboneKind::EfficientNetB5 => total,
    }
    .min(total)
}

/// The fitted statistics.
struct Gaussians {
    width: usize,
    height: usize,
    channel_index: Vec<usize>,
    mean: Vec<f32>,
    /// Per position, the inverse covariance packed by [`pack_precision`] (stored full).
    precision: Vec<f32>,
    /// Positions with a Gaussian; the others were ignored in every training image.
    sampled: Vec<bool>,
}

/// PaDiM (Defard et al., ICPR 2020).
pub struct PadimDetector {
    settings: PadimSettings,
    backbone: Backbone,
    total_channels: usize,
    fitted: Option<Gaussians>,
}

impl PadimDetector {
    /// Checks the settings and loads the backbone (an unfitted detector).
    pub fn new(mut settings: PadimSettings) -> Result<Self> {
        if settings.layers.is_empty() {
            settings.layers = default_layers(settings.backbone);
        }
        let bad = |msg: String| Err(VigilError::Config(format!("PaDiM: {msg}")));
        if settings.input_size < 16 {
            return bad(format!("input_size must be at least 16 pixels, got {}", settings.input_size));
        }
        if !(settings.eps > 0.0 && settings.eps.is_finite()) {
            return bad(format!("eps must be positive, got {}", settings.eps));
        }
        if !(settings.sigma >= 0.0 && settings.sigma.is_finite()) {
            return bad(format!("sigma must be finite and non-negative, got {}", settings.sigma));
        }
        if settings.batch_size == 0 || settings.channels == Some(0) {
            return bad("batch_size and channels must be positive".into());
        }
        let backbone =
            Backbone::open(settings.backbone, settings.weights.as_deref(), settings.random_weights_seed)?;
        let total_channels =
            settings.layers.iter().map(|l| backbone.layer_info(l).map(|i| i.0)).sum::<Result<usize>>()?;
        if let Some(d) = settings.channels.filter(|&d| d > total_channels) {
            return bad(format!("channels = {d} exceeds the {total_channels} channels of the layers"));
        }
        Ok(PadimDetector { settings, backbone, total_channels, fitted: None })
    }

    /// Rebuilds a fitted detector from its settings and state.
    pub fn load(settings: &serde_json::Value, state: &TensorBag) -> Result<Self> {
        let settings: PadimSettings = serde_json::from_value(settings.clone())
            .map_err(|e| VigilError::Model(format!("PaDiM settings: {e}")))?;
        let mut detector = PadimDetector::new(settings)?;
        let channel_index: Vec<usize> = state
            .i64(CHANNELS_TENSOR)?
            .into_iter()
            .map(|c| usize::try_from(c).ok().filter(|&c| c < detector.total_channels))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                VigilError::Model(format!("tensor '{CHANNELS_TENSOR}' names a channel out of range"))
            })?;
        let d = channel_index.len();
        let shape = state.shape(MEAN_TENSOR)?.to_vec();
        let [height, width, dim] = shape[..] else {
            return Err(VigilError::Model(format!(
                "tensor '{MEAN_TENSOR}' has shape {shape:?}, expected [h, w, d]"
            )));
        };
        if dim != d {
            return Err(VigilError::Model(format!(
                "tensor '{MEAN_TENSOR}' has {dim} channels, '{CHANNELS_TENSOR}' names {d}"
            )));
        }
        let mean = state.f32(MEAN_TENSOR, None)?;
        let inv_cov = state.f32(INV_COV_TENSOR, Some(&[height, width, d, d]))?;
        let sampled = if state.names().any(|n| n == SAMPLED_TENSOR) {
            if state.shape(SAMPLED_TENSOR)? != [height, width] {
                return Err(VigilError::Model(format!(
                    "tensor '{SAMPLED_TENSOR}' has shape {:?}, expected [{height}, {width}]",
                    state.shape(SAMPLED_TENSOR)?
                )));
            }
            state.i64(SAMPLED_TENSOR)?.iter().map(|&v| v != 0).collect()
        } else {
            vec![true; width * height]
        };
        let precision = pack_all(&inv_cov, d);
        detector.fitted = Some(Gaussians { width, height, channel_index, mean, precision, sampled });
        Ok(detector)
    }

    pub fn settings_ref(&self) -> &PadimSettings {
        &self.settings
    }

    fn input_size(&self) -> (usize, usize) {
        (self.settings.input_size, self.settings.input_size)
    }

    /// Embeddings `[image][position][channel]` of the chosen channels, with the grid size.
    fn embeddings(&self, images: &[Image], channel_index: &[usize]) -> Result<(Vec<f32>, usize, usize)> {
        let features = self.backbone.extract(images, &self.settings.layers, self.input_size())?;
        let (w, h) = (features[0][0].width, features[0][0].height);
        let d = channel_index.len();
        let mut out = vec![0f32; images.len() * w * h * d];
        for (maps, dst) in features.iter().zip(out.chunks_exact_mut(w * h * d)) {
            let planes = concat_planes(maps, w, h);
            for (k, &c) in channel_index.iter().enumerate() {
                for (pos, &v) in planes[c].iter().enumerate() {
                    dst[pos * d + k] = v;
                }
            }
        }
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(VigilError::invalid(format!("PaDiM: backbone feature {} is not finite", out[i])));
        }
        Ok((out, w, h))
    }
}

/// Every channel of every layer as a plane on the first layer's grid; deeper layers are
/// up-sampled by nearest neighbour (each deeper cell covers its block of finer cells), as the
/// reference code does.
fn concat_planes(maps: &[FeatureMap], w: usize, h: usize) -> Vec<Vec<f32>> {
    let mut planes = Vec::new();
    for m in maps {
        for c in 0..m.channels {
            let src = m.plane(c);
            if (m.width, m.height) == (w, h) {
                planes.push(src.to_vec());
                continue;
            }
            let mut up = Vec::with_capacity(w * h);
            for y in 0..h {
                let sy = y * m.height / h;
                for x in 0..w {
                    up.push(src[sy * m.width + x * m.width / w]);
                }
            }
            planes.push(up);
        }
    }
    planes
}

/// Every position's `d`×`d` inverse covariance packed for scoring.
fn pack_all(inv_cov: &[f32], d: usize) -> Vec<f32> {
    inv_cov.par_chunks(d * d).flat_map_iter(|a| pack_precision(a, d)).collect()
}

impl Detector for PadimDetector {
    fn method(&self) -> &'static str {
        "padim"
    }

    fn weights_files(&self) -> Vec<vigil_core::WeightsFile> {
        self.backbone.weights_file().cloned().into_iter().collect()
    }

    fn channel_mode(&self) -> ChannelMode {
        ChannelMode::Rgb
    }

    fn fit(&mut self, train: &dyn ImageSource, ctx: &FitContext) -> Result<()> {
        let n = train.len();
        if n < 2 {
            return Err(VigilError::invalid("PaDiM needs at least 2 training images for a covariance"));
        }
        let total = self.total_channels;
        let d = self.settings.channels.unwrap_or_else(|| default_channels(self.settings.backbone, total));
        let channel_index: Vec<usize> = if d == total {
            (0..total).collect()
        } else {
            let mut picked = sample(&mut ChaCha8Rng::seed_from_u64(ctx.seed), total, d).into_vec();
            picked.sort_unstable();
            picked
        };
        let mut acc: Option<(GaussianAccumulator, usize, usize)> = None;
        let progress = ctx.show_progress.then_some("padim");
        for_each_batch(train, self.settings.batch_size, progress, |start, images| {
            let (batch, w, h) = self.embeddings(&images, &channel_index)?;
            let (gauss, _, _) = acc.get_or_insert_with(|| (GaussianAccumulator::new(w * h, d), w, h));
            // ignored positions stay out of each image's contribution to the Gaussians
            let kept: Vec<Option<Vec<bool>>> = (start..start + images.len())
                .map(|i| train.ignore_mask(i).map(|m| m.kept_cells(w, h)))
                .collect();
            let valid: Option<Vec<bool>> = kept
                .iter()
                .any(|k| k.is_some())
                .then(|| kept.into_iter().flat_map(|k| k.unwrap_or_else(|| vec![true; w * h])).collect());
            gauss.add_batch(&batch, images.len(), valid.as_deref());
            Ok(())
        })?;
        let (gauss, width, height) = acc.expect("at least one batch was processed");
        let (mean, inv_cov, sampled) = gauss.finish(self.settings.eps)?;
        let precision = pack_all(&inv_cov, d);
        self.fitted = Some(Gaussians { width, height, channel_index, mean, precision, sampled });
        Ok(())
    }

    fn score(&self, image: &Image, ignore: Option<&Mask>) -> Result<ScoreOutput> {
        let g = self.fitted.as_ref().ok_or_else(|| VigilError::Model("PaDiM is not fitted".into()))?;
        let (emb, w, h) = self.embeddings(std::slice::from_ref(image), &g.channel_index)?;
        if (w, h) != (g.width, g.height) {
            return Err(VigilError::Model(format!(
                "PaDiM: feature grid {w}x{h} differs from the fitted {}x{}",
                g.width, g.height
            )));
        }
        let d = g.channel_index.len();
        // Positions scored: those with a Gaussian, less the ignored ones unless the mask leaves
        // none of them (the pipeline still clears its pixels in the map).
        let mut kept = g.sampled.clone();
        if let Some(not_ignored) = ignore.map(|m| m.kept_cells(w, h)) {
            let both: Vec<bool> = kept.iter().zip(&not_ignored).map(|(&s, &n)| s && n).collect();
            if both.contains(&true) {
                kept = both;
            }
        }
        let kept_dist: Vec<Option<f32>> = (0..w * h)
            .into_par_iter()
            .map(|p| {
                kept[p].then(|| {
                    mahalanobis(
                        &emb[p * d..(p + 1) * d],
                        &g.mean[p * d..(p + 1) * d],
                        &g.precision[p * packed_len(d)..(p + 1) * packed_len(d)],
                    )
                })
            })
            .collect();
        // the others get the smallest scored distance, so nothing of theirs reaches the
        // smoothed map or the image score
        let floor = kept_dist.iter().flatten().copied().fold(f32::INFINITY, f32::min);
        let dist = kept_dist.into_iter().map(|v| v.unwrap_or(floor)).collect();
        let (iw, ih) = self.input_size();
        let map = Map::new(w, h, dist)?
            .resize_bilinear(iw, ih)
            .gaussian_blur_with(self.settings.sigma, self.settings.blur_border)
            .resize_bilinear(image.width, image.height);
        let image_score = match ignore.filter(|m| m.count() < m.data.len()) {
            None => map.max(),
            Some(m) => {
                let m = m.resize_nearest(map.width, map.height);
                map.data
                    .iter()
                    .zip(&m.data)
                    .filter(|(_, &ig)| !ig)
                    .map(|(&v, _)| v)
                    .fold(f32::NEG_INFINITY, f32::max)
            }
        };
        Ok(ScoreOutput { map, image_score: Some(image_score), log10_nfa: None })
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).expect("settings serialise to JSON")
    }

    fn state(&self) -> Result<TensorBag> {
        let g = self.fitted.as_ref().ok_or_else(|| VigilError::Model("PaDiM is not fitted".into()))?;
        let d = g.channel_index.len();
        let mut bag = TensorBag::new();
        bag.put_i64(CHANNELS_TENSOR, &[d], g.channel_index.iter().map(|&c| c as i64).collect());
        bag.put_f32(MEAN_TENSOR, &[g.height, g.width, d], g.mean.clone());
        let inv_cov = g.precision.chunks_exact(packed_len(d)).flat_map(|p| unpack_precision(p, d)).collect();
        bag.put_f32(INV_COV_TENSOR, &[g.height, g.width, d, d], inv_cov);
        bag.put_i64(SAMPLED_TENSOR, &[g.height, g.width], g.sampled.iter().map(|&s| s as i64).collect());
        Ok(bag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use vigil_core::InMemorySource;

    fn texture(seed: u64, defect: bool) -> Image {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (w, h) = (48, 48);
        let mut data = Vec::with_capacity(3 * w * h);
        // stripes at a random phase, so each position sees the whole pattern in training
        let phase = rng.gen_range(0..8);
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let stripe = if (x + y + c + phase) % 8 < 4 { 0.7 } else { 0.3 };
                    let v =
                        if defect && (20..30).contains(&x) && (20..30).contains(&y) { 0.0 } else { stripe };
                    data.push(v + rng.gen::<f32>() * 0.05);
                }
            }
        }
        Image::new(w, h, 3, data).unwrap()
    }

    fn small_settings() -> PadimSettings {
        // random ResNet-18 features vary with the image (random MobileNetV2 ones barely do)
        PadimSettings {
            backbone: BackboneKind::ResNet18,
            random_weights_seed: Some(3),
            input_size: 64,
            // stride 4 and 8 layers: their fields are small enough to localise on 48 px images
            layers: vec!["layer1".into(), "layer2".into()],
            channels: Some(8),
            ..Default::default()
        }
    }

    fn fitted(seed: u64) -> PadimDetector {
        let mut d = PadimDetector::new(small_settings()).unwrap();
        let train = InMemorySource::new((0..24).map(|i| texture(i, false)).collect());
        d.fit(&train, &FitContext { seed, ..Default::default() }).unwrap();
        d
    }

    #[test]
    fn planted_defect_scores_higher_than_normal_images() {
        let d = fitted(0);
        let normal = d.score(&texture(100, false), None).unwrap();
        let defect = d.score(&texture(101, true), None).unwrap();
        let (n, a) = (normal.image_score.unwrap(), defect.image_score.unwrap());
        assert!(a > 1.5 * n, "defect {a} vs normal {n}");
        // deep random features see wide fields, so the defect raises the map beyond its
        // square, but most inside it
        let inside: f32 = (20..30)
            .flat_map(|y| (20..30).map(move |x| (y, x)))
            .map(|(y, x)| defect.map.get(y, x))
            .sum::<f32>()
            / 100.0;
        assert!(inside > defect.map.mean(), "inside {inside} vs mean {}", defect.map.mean());
        assert!(inside > 3.0 * normal.map.max(), "inside {inside} vs normal max {}", normal.map.max());
    }

    #[test]
    fn fitted_statistics_equal_a_direct_computation_on_the_embeddings() {
        let d = fitted(4);
        let g = d.fitted.as_ref().unwrap();
        let dim = g.channel_index.len();
        let images: Vec<Image> = (0..24).map(|i| texture(i, false)).collect();
        let (emb, w, h) = d.embeddings(&images, &g.channel_index).unwrap();
        let p = w * h / 2 + 1;
        let sample = |s: usize, i: usize| emb[(s * w * h + p) * dim + i] as f64;
        let mean: Vec<f64> = (0..dim).map(|i| (0..24).map(|s| sample(s, i)).sum::<f64>() / 24.0).collect();
        let mut cov = vec![0f64; dim * dim];
        for i in 0..dim {
            assert!((g.mean[p * dim + i] as f64 - mean[i]).abs() < 1e-4);
            for j in 0..dim {
                cov[i * dim + j] =
                    (0..24).map(|s| (sample(s, i) - mean[i]) * (sample(s, j) - mean[j])).sum::<f64>() / 23.0;
            }
            cov[i * dim + i] += 0.01;
        }
        // stored inverse times the direct covariance is the identity
        let inv = &unpack_precision(&g.precision[p * packed_len(dim)..(p + 1) * packed_len(dim)], dim);
        for i in 0..dim {
            for j in 0..dim {
                let v: f64 = (0..dim).map(|k| inv[i * dim + k] as f64 * cov[k * dim + j]).sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-3, "({i},{j}) = {v}");
            }
        }
    }

    #[test]
    fn channel_subset_is_seeded_and_round_trip_gives_identical_scores() {
        let a = fitted(1);
        assert_eq!(
            a.fitted.as_ref().unwrap().channel_index,
            fitted(1).fitted.as_ref().unwrap().channel_index
        );
        assert_ne!(
            a.fitted.as_ref().unwrap().channel_index,
            fitted(2).fitted.as_ref().unwrap().channel_index
        );
        let bytes = a.state().unwrap().to_safetensors().unwrap();
        let back = PadimDetector::load(&a.settings(), &TensorBag::from_safetensors(&bytes).unwrap()).unwrap();
        let img = texture(9, true);
        let (x, y) = (a.score(&img, None).unwrap(), back.score(&img, None).unwrap());
        assert_eq!(x.map, y.map);
        assert_eq!(x.image_score, y.image_score);
    }

    /// Ignores the square 12..38 around the planted defect of a 48-px texture.
    fn defect_box() -> Mask {
        let mut ignore = Mask::empty(48, 48);
        for y in 12..38 {
            for x in 12..38 {
                ignore.data[y * 48 + x] = true;
            }
        }
        ignore
    }

    #[test]
    fn ignored_positions_are_left_out_of_the_score_and_the_map_around_them() {
        let d = fitted(0);
        let (defect, ignore) = (texture(101, true), defect_box());
        let all = d.score(&defect, None).unwrap();
        let masked = d.score(&defect, Some(&ignore)).unwrap();
        let outside = |map: &Map| {
            (0..48 * 48).filter(|&i| !ignore.data[i]).map(|i| map.data[i]).fold(f32::MIN, f32::max)
        };
        assert_eq!(masked.image_score, Some(outside(&masked.map)));
        assert!(masked.image_score < all.image_score);
        // ignored positions are lowered, never raised, and their halo leaves the map around the box
        assert!(masked.map.data.iter().zip(&all.map.data).all(|(m, a)| *m <= a + 1e-4 * a.abs()));
        assert!(
            outside(&masked.map) < outside(&all.map),
            "{} vs {}",
            outside(&masked.map),
            outside(&all.map)
        );
    }

    #[test]
    fn a_region_ignored_in_every_training_image_gets_no_gaussian_and_no_score() {
        let mut d = PadimDetector::new(small_settings()).unwrap();
        let train = InMemorySource {
            images: (0..24).map(|i| texture(i, false)).collect(),
            ignore: Some(defect_box()),
        };
        d.fit(&train, &FitContext::default()).unwrap();
        let g = d.fitted.as_ref().unwrap();
        let expected = defect_box().kept_cells(g.width, g.height);
        assert_eq!(g.sampled, expected);
        assert!(expected.contains(&false));
        // unsampled positions score the floor even when the test image comes without a mask
        let defect = texture(101, true);
        let unmasked = d.score(&defect, None).unwrap();
        let masked = d.score(&defect, Some(&defect_box())).unwrap();
        assert_eq!(unmasked.map, masked.map);
        let bytes = d.state().unwrap().to_safetensors().unwrap();
        let back = PadimDetector::load(&d.settings(), &TensorBag::from_safetensors(&bytes).unwrap()).unwrap();
        assert_eq!(back.fitted.as_ref().unwrap().sampled, expected);
        assert_eq!(back.score(&defect, None).unwrap().map, unmasked.map);
    }

    #[test]
    fn bad_settings_and_states_are_errors() {
        assert!(PadimDetector::new(PadimSettings { channels: Some(100_000), ..small_settings() }).is_err());
        assert!(PadimDetector::new(PadimSettings { eps: 0.0, ..small_settings() }).is_err());
        let unfitted = PadimDetector::new(small_settings()).unwrap();
        assert!(unfitted.score(&texture(0, false), None).is_err());
        let mut too_few = PadimDetector::new(small_settings()).unwrap();
        assert!(too_few.fit(&InMemorySource::new(vec![texture(0, false)]), &FitContext::default()).is_err());
        let mut bag = fitted(0).state().unwrap();
        bag.put_i64(CHANNELS_TENSOR, &[8], vec![999; 8]);
        assert!(PadimDetector::load(&unfitted.settings(), &bag)
            .err()
            .unwrap()
            .to_string()
            .contains("out of range"));
    }
}
