//! The PatchCore detector: settings, fit (streamed, memory-bounded), scoring, state.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vigil_backbones::{Backbone, BackboneKind};
use vigil_core::tensors::TensorData;
use vigil_core::{
    for_each_batch, BlurBorder, ChannelMode, Detector, FitContext, Image, ImageSource, Map, Mask, Result,
    ScoreOutput, TensorBag, VigilError,
};

use crate::coreset::{squared_distance, GaussianProjection, StreamingCoreset};
use crate::features::{patch_grid, PatchGrid};
use crate::knn::{BankData, MemoryBank};

const BANK_TENSOR: &str = "memory_bank";

/// PatchCore's settings. Every field has a default, so `{}` is a valid configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PatchcoreSettings {
    /// Feature extractor.
    pub backbone: BackboneKind,
    /// Weights file (`.safetensors`, `.pth`); `None`: the backbone's shipped weights
    /// (`vigil_backbones::default_weights_path`).
    pub weights: Option<PathBuf>,
    /// Seeded random weights instead of pretrained ones (tests, ablations); overrides `weights`.
    pub random_weights_seed: Option<u64>,
    /// Layers to tap, the first one setting the patch grid; empty: [`default_layers`].
    pub layers: Vec<String>,
    /// Side of the square network input in pixels; images are resized to it.
    pub input_size: usize,
    /// Side of the neighbourhood each patch feature averages (the paper's p = 3).
    pub neighbourhood: usize,
    /// Adaptive average pooling of each patch vector to this many values; `None` keeps all
    /// channels (as anomalib).
    pub target_dim: Option<usize>,
    /// Fraction of the training patches kept in the memory bank.
    pub coreset_ratio: f64,
    /// Patches are randomly projected to this many dimensions for the coreset selection when
    /// they have more (the selection only needs approximate distances).
    pub projection_dim: usize,
    /// Patches per greedy coreset pass. Greedy selection is quadratic in the patches it sees,
    /// so larger training sets are cut into chunks of this size, each reduced on its own (see
    /// [`StreamingCoreset`]); sets that fit in one chunk get the exact single-pass greedy.
    pub coreset_chunk: usize,
    /// Bound on the memory the fit holds (patch chunk, its projection and the bank), in MiB;
    /// when the bank at `coreset_ratio` would not fit beside a chunk, fewer patches are kept.
    pub memory_budget_mb: usize,
    /// Store the memory bank in half precision (half the memory; search still runs in f32).
    pub f16_bank: bool,
    /// Memory-bank neighbours of the nearest patch used by the image-score re-weighting
    /// (1 disables it: the image score is the largest patch distance).
    pub num_neighbors: usize,
    /// How the patch-distance grid is brought to the input size before smoothing: `nearest`
    /// (anomalib, the default) or `bilinear` (the paper's wording).
    pub map_upsampling: MapUpsampling,
    /// Gaussian smoothing of the anomaly map, in input-size pixels.
    pub sigma: f32,
    /// The smoothing's border: `whole-sample` mirror (anomalib, the default) or `half-sample`
    /// (scipy, as the original code).
    pub blur_border: BlurBorder,
    /// Images per backbone pass during the fit.
    pub batch_size: usize,
}

impl Default for PatchcoreSettings {
    fn default() -> Self {
        PatchcoreSettings {
            backbone: BackboneKind::MobileNetV2,
            weights: None,
            random_weights_seed: None,
            layers: Vec::new(),
            input_size: 256,
            neighbourhood: 3,
            target_dim: None,
            coreset_ratio: 0.1,
            projection_dim: 128,
            coreset_chunk: 32_768,
            memory_budget_mb: 4096,
            f16_bank: false,
            num_neighbors: 9,
            map_upsampling: MapUpsampling::Nearest,
            sigma: 4.0,
            blur_border: BlurBorder::WholeSample,
            batch_size: 8,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MapUpsampling {
    Bilinear,
    Nearest,
}

/// The layer pair each backbone taps by default: strides 8 and 16, mid-level features as in
/// the paper (WRN-50 layer2 + layer3).
pub fn default_layers(kind: BackboneKind) -> Vec<String> {
    let names: &[&str] = match kind {
        BackboneKind::MobileNetV2 => &["features.6", "features.13"],
        BackboneKind::EfficientNetLite0 => &["_blocks.4", "_blocks.10"],
        BackboneKind::EfficientNetB5 => &["features.3.4", "features.5.6"],
        BackboneKind::ResNet18 | BackboneKind::ResNet50 | BackboneKind::WideResNet50 => &["layer2", "layer3"],
    };
    names.iter().map(|s| s.to_string()).collect()
}

/// PatchCore (Roth et al., CVPR 2022).
pub struct PatchcoreDetector {
    settings: PatchcoreSettings,
    backbone: Backbone,
    bank: Option<MemoryBank>,
}

impl PatchcoreDetector {
    /// Checks the settings and loads the backbone (an unfitted detector).
    pub fn new(mut settings: PatchcoreSettings) -> Result<Self> {
        if settings.layers.is_empty() {
            settings.layers = default_layers(settings.backbone);
        }
        validate(&settings)?;
        let backbone =
            Backbone::open(settings.backbone, settings.weights.as_deref(), settings.random_weights_seed)?;
        for layer in &settings.layers {
            backbone.layer_info(layer)?;
        }
        Ok(PatchcoreDetector { settings, backbone, bank: None })
    }

    /// Rebuilds a fitted detector from its settings and state.
    pub fn load(settings: &serde_json::Value, state: &TensorBag) -> Result<Self> {
        let settings: PatchcoreSettings = serde_json::from_value(settings.clone())
            .map_err(|e| VigilError::Model(format!("PatchCore settings: {e}")))?;
        let mut detector = PatchcoreDetector::new(settings)?;
        let shape = state.shape(BANK_TENSOR)?.to_vec();
        let [rows, dim] = shape[..] else {
            return Err(VigilError::Model(format!(
                "tensor '{BANK_TENSOR}' has shape {shape:?}, expected [rows, dim]"
            )));
        };
        if rows == 0 {
            return Err(VigilError::Model(format!("tensor '{BANK_TENSOR}' is empty")));
        }
        let expected = detector.feature_dim()?;
        if dim != expected {
            return Err(VigilError::Model(format!(
                "tensor '{BANK_TENSOR}' has {dim} features per patch, the settings give {expected}"
            )));
        }
        let data = match &state.get(BANK_TENSOR)?.data {
            TensorData::F16(v) => BankData::F16(v.clone()),
            _ => BankData::F32(state.f32(BANK_TENSOR, None)?),
        };
        detector.bank = Some(MemoryBank::new(data, dim));
        Ok(detector)
    }

    pub fn settings_ref(&self) -> &PatchcoreSettings {
        &self.settings
    }

    /// Memory-bank rows (0 before the fit).
    pub fn bank_rows(&self) -> usize {
        self.bank.as_ref().map_or(0, |b| b.rows())
    }

    /// Values per patch feature.
    pub fn feature_dim(&self) -> Result<usize> {
        let channels: usize = self
            .settings
            .layers
            .iter()
            .map(|l| self.backbone.layer_info(l).map(|i| i.0))
            .sum::<Result<_>>()?;
        Ok(self.settings.target_dim.unwrap_or(channels))
    }

    fn input_size(&self) -> (usize, usize) {
        (self.settings.input_size, self.settings.input_size)
    }

    fn patches(&self, images: &[Image]) -> Result<Vec<PatchGrid>> {
        let features = self.backbone.extract(images, &self.settings.layers, self.input_size())?;
        features
            .iter()
            .map(|maps| patch_grid(maps, self.settings.neighbourhood, self.settings.target_dim))
            .collect()
    }

    /// Patch distances and the image score (paper's re-weighting) of one image. When `kept`
    /// marks some cells, only those are searched and scored; the others get the smallest kept
    /// distance, so an ignored patch raises neither the score nor, through the smoothing, the
    /// map around it.
    fn patch_scores(&self, bank: &MemoryBank, grid: &PatchGrid, kept: Option<&[bool]>) -> (Vec<f32>, f32) {
        // a mask that leaves no cell centre in is not applied here (the pipeline still clears
        // its pixels in the map)
        let kept = kept.filter(|k| k.contains(&true));
        let (dist, nearest) = match kept {
            None => bank.nearest(&grid.rows),
            Some(k) => {
                let (kept_dist, kept_nearest) = bank.nearest(&kept_rows(grid, k));
                let floor = kept_dist.iter().copied().fold(f32::INFINITY, f32::min);
                let mut dist = vec![floor; k.len()];
                let mut nearest = vec![0u32; k.len()];
                let cells = k.iter().enumerate().filter(|(_, &keep)| keep).map(|(i, _)| i);
                for (i, (d, n)) in cells.zip(kept_dist.into_iter().zip(kept_nearest)) {
                    (dist[i], nearest[i]) = (d, n);
                }
                (dist, nearest)
            }
        };
        let candidates = (0..dist.len()).filter(|&i| kept.is_none_or(|k| k[i]));
        let worst = candidates
            .max_by(|&a, &b| dist[a].total_cmp(&dist[b]).then(b.cmp(&a)))
            .expect("a feature grid has at least one patch");
        let score = dist[worst];
        if self.settings.num_neighbors <= 1 {
            return (dist, score);
        }
        // Re-weighting (paper eq. 7, as anomalib): a softmax over the distances from the worst
        // patch to the bank neighbours of its nearest bank row. A nearest row far from its own
        // neighbours (a rare normal pattern) keeps the full score; one amid many equally near
        // rows (a common pattern, so the match is less telling) lowers it.
        let support = bank.neighbours_of_row(nearest[worst] as usize, self.settings.num_neighbors);
        let query = &grid.rows[worst * grid.dim..(worst + 1) * grid.dim];
        let d: Vec<f32> = support.iter().map(|&i| squared_distance(query, &bank.row(i)).sqrt()).collect();
        let max = d.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = d.iter().map(|v| (v - max).exp()).sum();
        let weight = 1.0 - (d[0] - max).exp() / total;
        (dist, weight * score)
    }
}

fn validate(s: &PatchcoreSettings) -> Result<()> {
    let bad = |msg: String| Err(VigilError::Config(format!("PatchCore: {msg}")));
    if !(s.coreset_ratio > 0.0 && s.coreset_ratio <= 1.0) {
        return bad(format!("coreset_ratio must be in (0, 1], got {}", s.coreset_ratio));
    }
    if s.neighbourhood == 0 || s.neighbourhood.is_multiple_of(2) {
        return bad(format!("neighbourhood must be odd and positive, got {}", s.neighbourhood));
    }
    if s.input_size < 16 {
        return bad(format!("input_size must be at least 16 pixels, got {}", s.input_size));
    }
    if s.projection_dim == 0 || s.coreset_chunk == 0 || s.batch_size == 0 || s.num_neighbors == 0 {
        return bad("projection_dim, coreset_chunk, batch_size and num_neighbors must be positive".into());
    }
    if s.target_dim == Some(0) {
        return bad("target_dim must be positive".into());
    }
    if !(s.sigma >= 0.0 && s.sigma.is_finite()) {
        return bad(format!("sigma must be finite and non-negative, got {}", s.sigma));
    }
    Ok(())
}

/// The rows of the cells `kept` marks, in grid order.
fn kept_rows(grid: &PatchGrid, kept: &[bool]) -> Vec<f32> {
    grid.rows
        .chunks_exact(grid.dim)
        .zip(kept)
        .filter(|(_, &keep)| keep)
        .flat_map(|(row, _)| row.iter().copied())
        .collect()
}

impl Detector for PatchcoreDetector {
    fn method(&self) -> &'static str {
        "patchcore"
    }

    fn weights_files(&self) -> Vec<vigil_core::WeightsFile> {
        self.backbone.weights_file().cloned().into_iter().collect()
    }

    fn channel_mode(&self) -> ChannelMode {
        ChannelMode::Rgb
    }

    fn fit(&mut self, train: &dyn ImageSource, ctx: &FitContext) -> Result<()> {
        let n = train.len();
        if n == 0 {
            return Err(VigilError::invalid("PatchCore: no training images"));
        }
        let s = &self.settings;
        let mut coreset: Option<StreamingCoreset> = None;
        for_each_batch(train, s.batch_size, ctx.show_progress.then_some("patchcore"), |start, images| {
            for (offset, grid) in self.patches(&images)?.into_iter().enumerate() {
                let builder = match &mut coreset {
                    Some(c) => c,
                    None => {
                        coreset.insert(self.plan_coreset(n * grid.width * grid.height, grid.dim, ctx.seed)?)
                    }
                };
                // ignored patches never enter the bank
                match train.ignore_mask(start + offset) {
                    None => builder.push(&grid.rows),
                    Some(mask) => builder.push(&kept_rows(&grid, &mask.kept_cells(grid.width, grid.height))),
                }
            }
            Ok(())
        })?;
        let dim = self.feature_dim()?;
        let data = coreset.expect("at least one image was processed").finish();
        if data.is_empty() {
            return Err(VigilError::invalid("PatchCore: every training patch is ignored"));
        }
        self.bank = Some(MemoryBank::new(data, dim));
        Ok(())
    }

    fn score(&self, image: &Image, ignore: Option<&Mask>) -> Result<ScoreOutput> {
        let bank = self.bank.as_ref().ok_or_else(|| VigilError::Model("PatchCore is not fitted".into()))?;
        let grid = self.patches(std::slice::from_ref(image))?.pop().expect("one image in, one grid out");
        let kept = ignore.map(|m| m.kept_cells(grid.width, grid.height));
        let (dist, image_score) = self.patch_scores(bank, &grid, kept.as_deref());
        let (iw, ih) = self.input_size();
        let grid_map = Map::new(grid.width, grid.height, dist)?;
        let map = match self.settings.map_upsampling {
            MapUpsampling::Bilinear => grid_map.resize_bilinear(iw, ih),
            MapUpsampling::Nearest => grid_map.resize_nearest(iw, ih),
        }
        .gaussian_blur_with(self.settings.sigma, self.settings.blur_border)
        .resize_bilinear(image.width, image.height);
        Ok(ScoreOutput { map, image_score: Some(image_score), log10_nfa: None })
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).expect("settings serialise to JSON")
    }

    fn state(&self) -> Result<TensorBag> {
        let bank = self.bank.as_ref().ok_or_else(|| VigilError::Model("PatchCore is not fitted".into()))?;
        let mut bag = TensorBag::new();
        let shape = [bank.rows(), bank.dim()];
        match bank.data() {
            BankData::F32(v) => bag.put_f32(BANK_TENSOR, &shape, v.clone()),
            BankData::F16(v) => bag.put_f16(BANK_TENSOR, &shape, v.clone()),
        }
        Ok(bag)
    }
}

impl PatchcoreDetector {
    /// Sizes the streaming coreset for `total` patches of `dim` values within the memory budget.
    fn plan_coreset(&self, total: usize, dim: usize, seed: u64) -> Result<StreamingCoreset> {
        let s = &self.settings;
        let projection =
            (dim > s.projection_dim).then(|| GaussianProjection::new(dim, s.projection_dim, seed));
        let selection_dim = projection.as_ref().map_or(0, |p| p.out_dim);
        // equal chunks rather than full ones and a remainder, so every chunk gets the same share
        let chunks = total.div_ceil(s.coreset_chunk);
        let chunk_rows = total.div_ceil(chunks);
        let budget = s.memory_budget_mb as f64 * 1024.0 * 1024.0;
        let chunk_bytes = (chunk_rows * (dim + selection_dim) * 4) as f64;
        let bank_value_bytes = if s.f16_bank { 2.0 } else { 4.0 };
        let bank_room = (budget - chunk_bytes) / (dim as f64 * bank_value_bytes);
        if bank_room < 1.0 {
            return Err(VigilError::Config(format!(
                "PatchCore: memory_budget_mb = {} cannot hold one coreset chunk of {chunk_rows} patches \
                 x {dim} features ({:.0} MiB); raise it or lower coreset_chunk",
                s.memory_budget_mb,
                chunk_bytes / 1048576.0
            )));
        }
        let keep = s.coreset_ratio.min(bank_room / total as f64);
        Ok(StreamingCoreset::new(dim, chunk_rows, keep, projection, s.f16_bank, seed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use vigil_core::InMemorySource;

    /// A striped texture with mild noise; `defect` paints a dark square at (20, 20).
    fn texture(seed: u64, defect: bool) -> Image {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (w, h) = (48, 48);
        let mut data = Vec::with_capacity(3 * w * h);
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let stripe = if (x + y + c) % 8 < 4 { 0.7 } else { 0.3 };
                    let v =
                        if defect && (20..30).contains(&x) && (20..30).contains(&y) { 0.0 } else { stripe };
                    data.push(v + rng.gen::<f32>() * 0.05);
                }
            }
        }
        Image::new(w, h, 3, data).unwrap()
    }

    fn small_settings() -> PatchcoreSettings {
        // random ResNet-18 features vary with the image (random MobileNetV2 ones barely do);
        // 384 channels also exercise the random projection of the coreset
        PatchcoreSettings {
            backbone: BackboneKind::ResNet18,
            random_weights_seed: Some(3),
            input_size: 64,
            ..Default::default()
        }
    }

    fn fitted(settings: PatchcoreSettings, seed: u64) -> PatchcoreDetector {
        let mut d = PatchcoreDetector::new(settings).unwrap();
        let train = InMemorySource::new((0..6).map(|i| texture(i, false)).collect());
        d.fit(&train, &FitContext { seed, ..Default::default() }).unwrap();
        d
    }

    #[test]
    fn planted_defect_scores_higher_than_normal_images() {
        let d = fitted(small_settings(), 0);
        // 6 images x 8x8 patches at 10%
        assert_eq!(d.bank_rows(), 38);
        let normal = d.score(&texture(100, false), None).unwrap();
        let defect = d.score(&texture(101, true), None).unwrap();
        assert_eq!((defect.map.width, defect.map.height), (48, 48));
        let (n, a) = (normal.image_score.unwrap(), defect.image_score.unwrap());
        assert!(a > 1.5 * n, "defect {a} vs normal {n}");
        // the map peaks inside the defect
        let peak = defect.map.data.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        let (px, py) = (peak % 48, peak / 48);
        assert!((14..36).contains(&px) && (14..36).contains(&py), "peak at ({px}, {py})");
        defect.map.check_finite("defect").unwrap();
    }

    #[test]
    fn save_load_round_trip_gives_identical_scores_in_f32_and_f16() {
        for f16_bank in [false, true] {
            let d = fitted(PatchcoreSettings { f16_bank, ..small_settings() }, 5);
            let bytes = d.state().unwrap().to_safetensors().unwrap();
            let back = PatchcoreDetector::load(&d.settings(), &TensorBag::from_safetensors(&bytes).unwrap())
                .unwrap();
            let img = texture(7, true);
            let (a, b) = (d.score(&img, None).unwrap(), back.score(&img, None).unwrap());
            assert_eq!(a.map, b.map);
            assert_eq!(a.image_score, b.image_score);
        }
    }

    #[test]
    fn fit_is_deterministic_with_the_seed() {
        let bank = |seed| fitted(small_settings(), seed).state().unwrap();
        assert_eq!(bank(1), bank(1));
        assert_ne!(bank(1), bank(2));
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
    fn ignored_cells_are_left_out_of_the_score_and_the_map_around_them() {
        // without re-weighting the image score is the largest distance among the kept cells
        let d = fitted(PatchcoreSettings { num_neighbors: 1, ..small_settings() }, 0);
        let (defect, ignore) = (texture(101, true), defect_box());
        let grid = d.patches(std::slice::from_ref(&defect)).unwrap().pop().unwrap();
        let (dist, _) = d.patch_scores(d.bank.as_ref().unwrap(), &grid, None);
        let kept = ignore.kept_cells(grid.width, grid.height);
        // 64-px input, 8x8 grid: cells 2..=5 have their centres (15, 21, 27, 33 px of 48) in the box
        assert_eq!(kept.iter().filter(|&&k| !k).count(), 16);
        let kept_max = (0..dist.len()).filter(|&i| kept[i]).map(|i| dist[i]).fold(f32::MIN, f32::max);
        let all = d.score(&defect, None).unwrap();
        let masked = d.score(&defect, Some(&ignore)).unwrap();
        let score = masked.image_score.unwrap();
        assert!((score - kept_max).abs() <= 1e-4 * kept_max, "{score} vs {kept_max}");
        assert!(score < all.image_score.unwrap());
        // the ignored cells are lowered, never raised, and their halo leaves the map around the box
        assert!(masked.map.data.iter().zip(&all.map.data).all(|(m, a)| *m <= a + 1e-4 * a.abs()));
        let outside = |map: &Map| {
            (0..48 * 48).filter(|&i| !ignore.data[i]).map(|i| map.data[i]).fold(f32::MIN, f32::max)
        };
        assert!(
            outside(&masked.map) < outside(&all.map),
            "{} vs {}",
            outside(&masked.map),
            outside(&all.map)
        );
    }

    #[test]
    fn ignored_training_patches_stay_out_of_the_bank() {
        // every training image carries the dark square; ignoring it at fit time leaves it unseen
        let train = |ignore| InMemorySource { images: (0..6).map(|i| texture(i, true)).collect(), ignore };
        let score = |ignore| {
            let mut d = PatchcoreDetector::new(small_settings()).unwrap();
            d.fit(&train(ignore), &FitContext::default()).unwrap();
            d.score(&texture(101, true), None).unwrap().image_score.unwrap()
        };
        let (seen, unseen) = (score(None), score(Some(defect_box())));
        assert!(unseen > 1.5 * seen, "square left out of the bank {unseen} vs learned {seen}");
    }

    #[test]
    fn bad_settings_and_states_are_errors() {
        assert!(PatchcoreDetector::new(PatchcoreSettings { coreset_ratio: 0.0, ..small_settings() }).is_err());
        let e = PatchcoreDetector::new(PatchcoreSettings { layers: vec!["nope".into()], ..small_settings() });
        assert!(e.err().unwrap().to_string().contains("nope"));
        let unfitted = PatchcoreDetector::new(small_settings()).unwrap();
        assert!(unfitted.score(&texture(0, false), None).is_err());
        let mut bag = TensorBag::new();
        bag.put_f32(BANK_TENSOR, &[2, 5], vec![0.0; 10]);
        let e = PatchcoreDetector::load(&unfitted.settings(), &bag).err().unwrap().to_string();
        assert!(e.contains("features per patch"), "{e}");
        assert!(PatchcoreDetector::load(&unfitted.settings(), &TensorBag::new()).is_err());
    }

    #[test]
    fn a_tight_memory_budget_is_reported() {
        let mut d =
            PatchcoreDetector::new(PatchcoreSettings { memory_budget_mb: 0, ..small_settings() }).unwrap();
        let train = InMemorySource::new(vec![texture(0, false)]);
        let e = d.fit(&train, &FitContext::default()).unwrap_err().to_string();
        assert!(e.contains("memory_budget_mb"), "{e}");
    }
}
