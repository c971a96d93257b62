//! The image pipeline around a method: colour conversion, registration, tiling and stitching,
//! ignore masks (both modes) and image scores from maps.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::ignore::IgnoreMode;
use crate::tiling::TiledSource;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use vigil_core::{ChannelMode, Detector, Image, ImageSource, Map, Mask, ModelFile};
use vigil_data::source::{BadFilePolicy, FileSource, SourceOptions};
use vigil_metrics::ImageScoreReduction;
use vigil_register::{Registration, RegistrationSettings};

/// How images go through the pipeline, as the user asked for them. `None` fields are "not given":
/// at fit time they take the defaults, at predict time the model's own settings.
#[derive(Clone, Debug, Default)]
pub struct PipelineOptions {
    /// Square tiles of this size (pixels) scored one by one and stitched.
    pub tile: Option<usize>,
    /// Overlap between neighbouring tiles (pixels; with `tile`).
    pub overlap: Option<usize>,
    /// A mask image of regions to ignore (non-zero = ignored).
    pub ignore: Option<PathBuf>,
    pub ignore_mode: Option<IgnoreMode>,
    /// A reference view every image is aligned to before scoring.
    pub register: Option<PathBuf>,
    /// How an image score is made from its map when the method has none of its own.
    pub image_score: Option<ImageScoreReduction>,
    /// What to do with a file that cannot be read.
    pub bad_files: BadFilePolicy,
}

/// Whether images are grayscale or in colour, as they come from the files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ColourMode {
    /// One channel, or three equal ones.
    Gray,
    Colour,
}

impl ColourMode {
    pub fn of(image: &Image) -> ColourMode {
        if image.channels == 1 {
            return ColourMode::Gray;
        }
        let first = image.channel(0);
        let equal = (1..image.channels.min(3)).all(|c| image.channel(c) == first);
        if equal {
            ColourMode::Gray
        } else {
            ColourMode::Colour
        }
    }
}

impl std::fmt::Display for ColourMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ColourMode::Gray => "grayscale",
            ColourMode::Colour => "colour",
        })
    }
}

/// Pipeline settings stored in the model file, so `test` and `predict` score exactly as `fit` did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PipelineSettings {
    pub tile: Option<usize>,
    pub overlap: usize,
    pub ignore_mode: Option<IgnoreMode>,
    /// Source of the ignore mask (informational; the mask itself is stored in the model state).
    pub ignore_path: Option<PathBuf>,
    pub image_score: Option<ImageScoreReduction>,
    /// Channels of the training images as the method saw them (models from before `colour`).
    pub channels: Option<usize>,
    /// Colour mode of the training images; images of the other mode are converted to it first.
    #[serde(default)]
    pub colour: Option<ColourMode>,
    /// Size (width, height) of the first training image, to warn about much larger test images.
    #[serde(default)]
    pub train_size: Option<(usize, usize)>,
    /// Source of the registration reference (informational; the reference itself is stored in the model state).
    pub register_path: Option<PathBuf>,
}

/// A ready-to-score pipeline: settings plus the loaded ignore mask and registration reference.
pub struct Pipeline {
    pub settings: PipelineSettings,
    pub ignore: Option<Mask>,
    pub policy: BadFilePolicy,
    /// The reference view every image is aligned to, and its prepared features.
    pub registration: Option<(Image, Registration)>,
    /// Conversions between colour modes and large images are reported once per run.
    colour_reported: AtomicBool,
    size_reported: AtomicBool,
}

/// One scored image.
pub struct Scored {
    pub map: Map,
    pub image_score: f32,
    pub log10_nfa: Option<Map>,
}

pub const IGNORE_TENSOR: &str = "pipeline.ignore_mask";
pub const REFERENCE_TENSOR: &str = "pipeline.registration_reference";

fn registration_for(reference: Image) -> Result<(Image, Registration)> {
    let reg = Registration::new(&reference, RegistrationSettings::default())
        .context("cannot use this image as the registration reference")?;
    Ok((reference, reg))
}

fn load_ignore(path: &Path) -> Result<Mask> {
    let mask = vigil_data::io::load_mask(path, None, false)?;
    if mask.count() == mask.data.len() {
        bail!("{}: the ignore mask covers the whole image; nothing would be inspected", path.display());
    }
    Ok(mask)
}

impl Pipeline {
    fn with(settings: PipelineSettings, ignore: Option<Mask>, policy: BadFilePolicy) -> Pipeline {
        Pipeline {
            settings,
            ignore,
            policy,
            registration: None,
            colour_reported: AtomicBool::new(false),
            size_reported: AtomicBool::new(false),
        }
    }

    /// A pipeline for fitting, checked before any image is read.
    pub fn new(options: &PipelineOptions) -> Result<Pipeline> {
        let ignore_mode = match options.ignore_mode {
            None => options.ignore.as_ref().map(|_| IgnoreMode::After),
            Some(mode) => Some(mode),
        };
        if ignore_mode.is_some() && options.ignore.is_none() {
            bail!("--ignore-mode needs --ignore <mask image>");
        }
        let ignore = options.ignore.as_deref().map(load_ignore).transpose()?;
        if let Some(t) = options.tile {
            if t < 8 {
                bail!("--tile {t} is too small (at least 8 pixels)");
            }
            if options.overlap.unwrap_or(0) >= t {
                bail!("--overlap must be smaller than --tile");
            }
        }
        if options.register.is_some() && options.tile.is_some() {
            bail!("--register and --tile cannot be combined: register whole views, tile very large images");
        }
        let settings = PipelineSettings {
            tile: options.tile,
            overlap: options.overlap.or(options.tile.map(crate::tiling::default_overlap)).unwrap_or(0),
            ignore_mode,
            ignore_path: options.ignore.clone(),
            image_score: options.image_score,
            register_path: options.register.clone(),
            ..Default::default()
        };
        let mut pipeline = Pipeline::with(settings, ignore, options.bad_files);
        if let Some(p) = &options.register {
            pipeline.registration = Some(
                registration_for(vigil_data::io::load_image(p)?).with_context(|| p.display().to_string())?,
            );
        }
        Ok(pipeline)
    }

    /// The pipeline a model was fitted with; options given now (tiling, score, ignore, registration)
    /// override it, with a warning, since the model's thresholds were set with its own settings.
    pub fn from_model(model: &ModelFile, options: &PipelineOptions) -> Result<Pipeline> {
        let stored: PipelineSettings = serde_json::from_value(model.header.pipeline.clone())
            .context("model file: pipeline settings are not valid")?;
        let mut p = Pipeline::new(options)?;
        let mut differs = Vec::new();
        if options.tile.is_none() {
            p.settings.tile = stored.tile;
            p.settings.overlap = stored.overlap;
        } else if (p.settings.tile, p.settings.overlap) != (stored.tile, stored.overlap) {
            differs.push(format!(
                "tiling ({} now, {} at fit)",
                describe_tiling(p.settings.tile, p.settings.overlap),
                describe_tiling(stored.tile, stored.overlap)
            ));
        }
        p.settings.channels = stored.channels;
        p.settings.colour = stored.colour;
        p.settings.train_size = stored.train_size;
        if options.register.is_none() {
            if stored.register_path.is_some() {
                let shape = model.state.shape(REFERENCE_TENSOR)?.to_vec();
                let data = model.state.f32(REFERENCE_TENSOR, None)?;
                p.registration = Some(registration_for(Image::new(shape[2], shape[1], shape[0], data)?)?);
                p.settings.register_path = stored.register_path;
            }
        } else {
            differs.push("a registration reference given now".to_string());
        }
        match &p.settings.image_score {
            None => p.settings.image_score = stored.image_score,
            Some(r) if Some(*r) != stored.image_score => differs.push(format!("the image score ({r} now)")),
            Some(_) => {}
        }
        if options.ignore.is_none() {
            p.settings.ignore_mode = stored.ignore_mode;
            p.settings.ignore_path = stored.ignore_path;
            if p.settings.ignore_mode.is_some() {
                let shape = model.state.shape(IGNORE_TENSOR)?.to_vec();
                let v = model.state.f32(IGNORE_TENSOR, None)?;
                p.ignore = Some(Mask::new(shape[1], shape[0], v.iter().map(|&x| x > 0.5).collect())?);
            }
        } else {
            differs.push("an ignore mask given now".to_string());
        }
        if !differs.is_empty() {
            crate::warn(format!(
                "pipeline options differ from the fit: {}; the model's thresholds were set without them",
                differs.join(", ")
            ));
        }
        Ok(p)
    }

    fn before(&self) -> bool {
        matches!(self.settings.ignore_mode, Some(IgnoreMode::Before))
    }

    /// Records what the training images are (colour mode, size) before the method sees them.
    pub fn record_training_image(&mut self, image: &Image) {
        self.settings.colour = Some(ColourMode::of(image));
        self.settings.train_size = Some((image.width, image.height));
    }

    /// Checks, before any work, that the ignore mask fits an image of this size.
    pub fn check_size(&self, width: usize, height: usize, name: &str) -> Result<()> {
        match &self.ignore {
            Some(m) if (m.width, m.height) != (width, height) => bail!(
                "{name}: image is {width}x{height} but the ignore mask is {}x{}; ignore masks must match the images",
                m.width,
                m.height
            ),
            _ => Ok(()),
        }
    }

    /// The image in the colour mode of the training images, then in the method's channel layout.
    /// Every method sees images of the other mode converted the same way.
    pub fn conform(&self, mode: ChannelMode, image: &Image) -> Image {
        let converted = match (self.settings.colour, ColourMode::of(image)) {
            (Some(ColourMode::Gray), ColourMode::Colour) => {
                self.report_conversion("colour", "grayscale");
                Some(image.to_gray())
            }
            (Some(ColourMode::Colour), ColourMode::Gray) if image.channels == 1 => {
                self.report_conversion("grayscale", "colour (channels replicated)");
                Some(image.to_rgb())
            }
            _ => None,
        };
        let image = mode.convert(converted.as_ref().unwrap_or(image));
        // Models from before the colour mode was recorded keep their channel rule.
        match (self.settings.colour, self.settings.channels) {
            (None, Some(3)) if image.channels != 3 => image.to_rgb(),
            (None, Some(1)) if image.channels != 1 => image.to_gray(),
            _ => image,
        }
    }

    fn report_conversion(&self, from: &str, to: &str) {
        if !self.colour_reported.swap(true, Ordering::Relaxed) {
            crate::warn(format!(
                "the model was fitted on {to} images: {from} images are converted to {to} before scoring"
            ));
        }
    }

    fn check_scale(&self, image: &Image, name: &str) {
        let Some((w, h)) = self.settings.train_size else { return };
        if self.settings.tile.is_none()
            && (image.width > 4 * w || image.height > 4 * h)
            && !self.size_reported.swap(true, Ordering::Relaxed)
        {
            crate::warn(format!(
                "{name} is {}x{}, more than 4 times the training images ({w}x{h}) on a side, and is scored \
                 whole: small defects may vanish when the method resizes it; consider --tile",
                image.width, image.height
            ));
        }
    }

    fn ignore_for(&self, image: &Image, name: &str) -> Result<Option<Mask>> {
        self.check_size(image.width, image.height, name)?;
        Ok(self.ignore.clone())
    }

    /// Score one image (as loaded from its file) with the detector through colour conversion,
    /// registration, tiling and ignore masks. The map is in the image's own frame.
    pub fn score(&self, det: &dyn Detector, image: &Image, name: &str) -> Result<Scored> {
        self.check_scale(image, name);
        let image = &self.conform(det.channel_mode(), image);
        let Some((_, registration)) = &self.registration else {
            return self.score_aligned(det, image, name, None);
        };
        let registered = registration.register(image).with_context(|| format!("{name}: registration"))?;
        let unseen = invert(&registered.valid);
        let scored = self.score_aligned(det, &registered.image, name, Some(&unseen))?;
        // Back to the image's frame: the map follows the inverse of the image-to-reference homography.
        let back = registered
            .homography
            .inverse()
            .ok_or_else(|| anyhow!("{name}: registration gave a singular homography"))?;
        let to_image_frame = |map: &Map, fill: f32| -> Result<Map> {
            let plane = Image::new(map.width, map.height, 1, map.data.clone())?;
            let (warped, seen) = vigil_register::warp_perspective(&plane, &back, image.width, image.height)?;
            let data = warped.data.iter().zip(&seen.data).map(|(&v, &s)| if s { v } else { fill }).collect();
            Ok(Map::new(image.width, image.height, data)?)
        };
        let map = to_image_frame(&scored.map, scored.map.min())?;
        let log10_nfa = match &scored.log10_nfa {
            Some(n) => Some(to_image_frame(n, n.max().max(1.0))?),
            None => None,
        };
        Ok(Scored { map, image_score: scored.image_score, log10_nfa })
    }

    /// Score an image already in the reference frame; `unseen` marks pixels outside its field of view,
    /// which are treated like ignored pixels after scoring.
    fn score_aligned(
        &self,
        det: &dyn Detector,
        image: &Image,
        name: &str,
        unseen: Option<&Mask>,
    ) -> Result<Scored> {
        let ignore = self.ignore_for(image, name)?;
        let before = self.before();
        let method_ignore = ignore.as_ref().filter(|_| before);
        let out = match self.settings.tile {
            Some(tile) => {
                crate::tiling::score_detector_tiled(image, method_ignore, tile, self.settings.overlap, det)
                    .with_context(|| format!("{name}: tiled scoring"))?
            }
            None => det.score(image, method_ignore).with_context(|| name.to_string())?,
        };
        let (mut map, mut nfa, mut own_score) = (out.map, out.log10_nfa, out.image_score);
        if map.width != image.width || map.height != image.height {
            bail!(
                "{name}: method returned a {}x{} map for a {}x{} image",
                map.width,
                map.height,
                image.width,
                image.height
            );
        }
        map.check_finite(name)?;
        // Ignored pixels never show in the map or the NFA, whichever mode. In "before" mode the
        // method already left them out of its own score; in "after" mode (and outside the field of
        // view) it saw them, so the score is made again from the masked map.
        let cleared = match (ignore.as_ref(), unseen) {
            (Some(a), Some(b)) => Some(union(a, b)),
            (a, b) => a.or(b).cloned(),
        };
        if let Some(cleared) = &cleared {
            crate::ignore::apply_after(&mut map, cleared)?;
            if let Some(n) = nfa.as_mut() {
                crate::ignore::silence_nfa(n, cleared);
            }
            if !before || unseen.is_some() {
                own_score = None;
            }
        }
        let image_score = match (&self.settings.image_score, own_score) {
            (Some(r), _) => r.reduce(&map)?,
            (None, Some(s)) => s,
            (None, None) => map.max(),
        };
        Ok(Scored { map, image_score, log10_nfa: nfa })
    }

    /// The training images as the method sees them: converted like test images, aligned, tiled, and
    /// with the "before" ignore mask.
    pub fn source<'a>(&'a self, paths: Vec<PathBuf>, mode: ChannelMode) -> Result<Box<dyn ImageSource + 'a>> {
        let ignore = self.ignore.clone().filter(|_| self.before());
        let options = SourceOptions { ignore, bad_files: self.policy, ..SourceOptions::new(mode) };
        let source = FileSource::open(&paths, options)?;
        for (path, err) in source.skipped() {
            crate::warn(format!("skipped {}: {err}", path.display()));
        }
        let conform = |inner: Box<dyn ImageSource + 'a>| ConformedSource { inner, pipeline: self, mode };
        Ok(match (self.settings.tile, &self.registration) {
            (Some(tile), _) => {
                Box::new(conform(Box::new(TiledSource::new(source, tile, self.settings.overlap)?)))
            }
            (None, Some((_, registration))) => {
                Box::new(RegisteredSource { inner: conform(Box::new(source)), registration })
            }
            (None, None) => Box::new(conform(Box::new(source))),
        })
    }
}

fn describe_tiling(tile: Option<usize>, overlap: usize) -> String {
    match tile {
        Some(t) => format!("tiles of {t} px, overlap {overlap}"),
        None => "no tiles".into(),
    }
}

fn invert(valid: &Mask) -> Mask {
    Mask { width: valid.width, height: valid.height, data: valid.data.iter().map(|&v| !v).collect() }
}

fn union(a: &Mask, b: &Mask) -> Mask {
    Mask {
        width: a.width,
        height: a.height,
        data: a.data.iter().zip(&b.data).map(|(&x, &y)| x || y).collect(),
    }
}

/// Training images in the colour mode of the model (the first image's), like test images.
struct ConformedSource<'a> {
    inner: Box<dyn ImageSource + 'a>,
    pipeline: &'a Pipeline,
    mode: ChannelMode,
}

impl ImageSource for ConformedSource<'_> {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn name(&self, index: usize) -> String {
        self.inner.name(index)
    }
    fn load(&self, index: usize) -> vigil_core::Result<Image> {
        Ok(self.pipeline.conform(self.mode, &self.inner.load(index)?))
    }
    fn ignore_mask(&self, index: usize) -> Option<Mask> {
        self.inner.ignore_mask(index)
    }
}

/// Training images aligned to the registration reference. Pixels outside an image's field of view
/// join the "before" ignore mask, so they never enter the method's statistics.
struct RegisteredSource<'a> {
    inner: ConformedSource<'a>,
    registration: &'a Registration,
}

impl RegisteredSource<'_> {
    fn registered(&self, index: usize) -> vigil_core::Result<vigil_register::Registered> {
        let image = self.inner.load(index)?;
        self.registration
            .register(&image)
            .map_err(|e| vigil_core::VigilError::file(self.inner.name(index), format!("registration: {e}")))
    }
}

impl ImageSource for RegisteredSource<'_> {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn name(&self, index: usize) -> String {
        self.inner.name(index)
    }
    fn load(&self, index: usize) -> vigil_core::Result<Image> {
        Ok(self.registered(index)?.image)
    }
    fn ignore_mask(&self, index: usize) -> Option<Mask> {
        let unseen = self.registered(index).ok().map(|r| invert(&r.valid));
        match (self.inner.ignore_mask(index), unseen) {
            (Some(a), Some(b)) => Some(union(&a, &b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_core::{FitContext, ScoreOutput, TensorBag};

    /// A method whose map is the image itself and whose own score is its maximum over the pixels
    /// it was not told to ignore, with an NFA map that marks bright pixels.
    struct Brightness;

    impl Detector for Brightness {
        fn method(&self) -> &'static str {
            "brightness"
        }
        fn channel_mode(&self) -> ChannelMode {
            ChannelMode::Gray
        }
        fn fit(&mut self, _: &dyn ImageSource, _: &FitContext) -> vigil_core::Result<()> {
            Ok(())
        }
        fn score(&self, image: &Image, ignore: Option<&Mask>) -> vigil_core::Result<ScoreOutput> {
            let map = Map::new(image.width, image.height, image.data.clone())?;
            let own = map
                .data
                .iter()
                .enumerate()
                .filter(|(i, _)| !ignore.is_some_and(|m| m.data[*i]))
                .map(|(_, &v)| v)
                .fold(0.0, f32::max);
            let nfa = Map::new(image.width, image.height, map.data.iter().map(|&v| -10.0 * v).collect())?;
            Ok(ScoreOutput { map, image_score: Some(own), log10_nfa: Some(nfa) })
        }
        fn settings(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
        fn state(&self) -> vigil_core::Result<TensorBag> {
            Ok(TensorBag::new())
        }
    }

    fn pipeline_with_ignore(mode: IgnoreMode) -> Pipeline {
        let mut ignore = Mask::empty(4, 4);
        ignore.data[5] = true;
        let settings = PipelineSettings { ignore_mode: Some(mode), ..Default::default() };
        Pipeline::with(settings, Some(ignore), BadFilePolicy::Stop)
    }

    #[test]
    fn before_mode_clears_ignored_pixels_of_map_and_nfa() {
        let mut image = Image::zeros(4, 4, 1);
        image.data[5] = 1.0;
        image.data[10] = 0.25;
        for mode in [IgnoreMode::Before, IgnoreMode::After] {
            let scored = pipeline_with_ignore(mode).score(&Brightness, &image, "x").unwrap();
            assert_eq!(scored.map.data[5], 0.0, "{mode}: ignored pixel must be cleared in the map");
            let nfa = scored.log10_nfa.unwrap();
            assert!(nfa.data[5] >= 1.0, "{mode}: ignored pixel must be silenced in the NFA map");
            assert!(nfa.data[10] < 0.0, "{mode}: other pixels keep their NFA");
            assert_eq!(scored.image_score, 0.25, "{mode}");
        }
    }

    #[test]
    fn images_of_the_other_colour_mode_are_converted_to_the_training_mode() {
        let mut gray_model = Pipeline::with(PipelineSettings::default(), None, BadFilePolicy::Stop);
        gray_model.record_training_image(&Image::zeros(2, 2, 1));
        let colour = Image::new(1, 1, 3, vec![1.0, 0.0, 0.0]).unwrap();
        let seen = gray_model.conform(ChannelMode::Rgb, &colour);
        assert_eq!(seen.channels, 3);
        assert_eq!(ColourMode::of(&seen), ColourMode::Gray, "a colour image reaches a gray model as gray");
        assert_eq!(ColourMode::of(&Image::new(1, 1, 3, vec![0.5; 3]).unwrap()), ColourMode::Gray);
    }
}
