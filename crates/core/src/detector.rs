//! The one interface every method implements: fit on normal images, score an image into a map.

use std::path::PathBuf;

use crate::fingerprint::{DataFingerprint, ImageSetHasher, WeightsFile};
use crate::{Image, Map, Mask, Result, TensorBag, ThresholdKind};

/// What colour layout a method wants; the pipeline converts before calling it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelMode {
    /// One channel (colour images are converted to luminance).
    Gray,
    /// Three channels (grayscale is replicated, alpha dropped).
    Rgb,
    /// Whatever the file holds (1 or 3 channels; alpha dropped).
    Native,
}

impl ChannelMode {
    pub fn convert(self, image: &Image) -> Image {
        match (self, image.channels) {
            (ChannelMode::Gray, _) => image.to_gray(),
            (ChannelMode::Rgb, _) => image.to_rgb(),
            (ChannelMode::Native, 1) | (ChannelMode::Native, 3) => image.clone(),
            (ChannelMode::Native, _) => image.to_rgb(),
        }
    }
}

/// A read-only, indexable set of images, loaded on demand so methods can stream sets larger
/// than memory. Images come converted to the method's [`ChannelMode`].
pub trait ImageSource: Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A name for messages (usually the file path).
    fn name(&self, index: usize) -> String;
    fn load(&self, index: usize) -> Result<Image>;
    /// Pixels to leave out of the statistics (the "before" ignore mask), if any.
    fn ignore_mask(&self, _index: usize) -> Option<Mask> {
        None
    }
    /// What this set is, for training checkpoints to check that a resumed fit sees the same
    /// images. The default hashes every image as delivered; file sources hash the files instead.
    fn fingerprint(&self) -> Result<DataFingerprint> {
        let mut hasher = ImageSetHasher::default();
        for i in 0..self.len() {
            hasher.add(&self.load(i)?);
        }
        let origin = match self.len() {
            0 => "an empty image set".to_string(),
            1 => self.name(0),
            n => format!("{} and {} more images", self.name(0), n - 1),
        };
        Ok(hasher.finish(origin))
    }
}

/// Loads `source` in consecutive batches of `batch_size` images and hands each batch to `f`
/// with the index of its first image; with `progress`, a bar with that label counts the images.
pub fn for_each_batch(
    source: &dyn ImageSource,
    batch_size: usize,
    progress: Option<&str>,
    mut f: impl FnMut(usize, Vec<Image>) -> Result<()>,
) -> Result<()> {
    let n = source.len();
    let bar = progress.map(|label| crate::progress::bar(n as u64, label));
    for start in (0..n).step_by(batch_size.max(1)) {
        let end = (start + batch_size.max(1)).min(n);
        let images = (start..end).map(|i| source.load(i)).collect::<Result<Vec<_>>>()?;
        f(start, images)?;
        if let Some(bar) = &bar {
            bar.inc((end - start) as u64);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(())
}

/// Images already in memory.
pub struct InMemorySource {
    pub images: Vec<Image>,
    pub ignore: Option<Mask>,
}

impl InMemorySource {
    pub fn new(images: Vec<Image>) -> Self {
        InMemorySource { images, ignore: None }
    }
}

impl ImageSource for InMemorySource {
    fn len(&self) -> usize {
        self.images.len()
    }
    fn name(&self, index: usize) -> String {
        format!("image #{index}")
    }
    fn load(&self, index: usize) -> Result<Image> {
        Ok(self.images[index].clone())
    }
    fn ignore_mask(&self, _index: usize) -> Option<Mask> {
        self.ignore.clone()
    }
}

/// Everything a fit needs besides the images.
#[derive(Clone, Debug, Default)]
pub struct FitContext {
    pub seed: u64,
    /// Where a long fit keeps checkpoints so an interrupted run can resume (None: no checkpoints).
    pub checkpoint_dir: Option<PathBuf>,
    pub show_progress: bool,
}

/// What scoring one image produces.
#[derive(Clone, Debug)]
pub struct ScoreOutput {
    /// Anomaly map at the input image's size; larger = more anomalous.
    pub map: Map,
    /// The method's own image score where it defines one (PatchCore's re-weighting, DRAEM's
    /// mean-filtered max); otherwise the pipeline reduces the map.
    pub image_score: Option<f32>,
    /// log10 NFA per pixel for a contrario methods (≤ −k is a detection at level k).
    pub log10_nfa: Option<Map>,
}

impl ScoreOutput {
    pub fn from_map(map: Map) -> Self {
        ScoreOutput { map, image_score: None, log10_nfa: None }
    }
}

/// A method: learns normality from normal images, then scores an image into an anomaly map.
pub trait Detector: Send + Sync {
    /// The method's name as the CLI and model files know it.
    fn method(&self) -> &'static str;
    fn channel_mode(&self) -> ChannelMode;
    /// Learn from normal images.
    fn fit(&mut self, train: &dyn ImageSource, ctx: &FitContext) -> Result<()>;
    /// Score one image (already converted to `channel_mode`). `ignore` marks pixels the method
    /// must leave out of its statistics (the "before" ignore mode); the map still covers them.
    fn score(&self, image: &Image, ignore: Option<&Mask>) -> Result<ScoreOutput>;
    /// Settings needed to rebuild the method before `load_state`.
    fn settings(&self) -> serde_json::Value;
    /// The learned state.
    fn state(&self) -> Result<TensorBag>;
    /// The threshold kind the method justifies by itself (NFA for a contrario methods).
    fn default_threshold(&self) -> Option<ThresholdKind> {
        None
    }
    /// The pretrained weights files the detector runs (as opened, with their SHA-256), so a
    /// model file can record them and refuse other weights at load time.
    fn weights_files(&self) -> Vec<WeightsFile> {
        Vec::new()
    }
    /// For tiled scoring of one large image: a detector that scores its tiles with statistics
    /// taken from all of `tiles` (the tiles of that image), so neighbouring tiles agree. Only
    /// methods whose statistics come from the image under test need one; the default, None,
    /// scores every tile with `self`.
    fn with_statistics_of(&self, _tiles: &dyn ImageSource) -> Result<Option<Box<dyn Detector>>> {
        Ok(None)
    }
}
