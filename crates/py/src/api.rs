//! What the Python package does, in plain Rust (no Python types): settings given as keyword
//! arguments turned into the engine's options, NumPy-layout pixels turned into images, and scoring
//! through the same engine calls as `vigil predict`, so both give the same numbers.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use vigil_core::{Image, Map, Mask};
use vigil_data::source::BadFilePolicy;
use vigil_engine::fit::FitOptions;
use vigil_engine::model::LoadOptions;
use vigil_engine::run::{process_items, Event, ImageFilter, Item, LoopOptions, Skipped};
use vigil_engine::{MethodSpec, Model, PipelineOptions};
use vigil_metrics::ThresholdRule;

/// A setting's value as Python gave it, written as on the command line (`true`, `0.2`, `max`).
pub type Setting = (String, String);

/// Settings of the image pipeline (the CLI's pipeline flags, with `_` for `-`).
const PIPELINE_KEYS: [&str; 8] =
    ["tile", "overlap", "ignore", "ignore_mode", "register", "image_score", "skip_bad", "glob"];
/// Settings of fitting and thresholds (the CLI's fit flags).
const FIT_KEYS: [&str; 9] = [
    "val_fraction",
    "fit_on_all",
    "threshold",
    "pixel_threshold",
    "seed",
    "checkpoint_dir",
    "val_anomalous",
    "val_masks",
    "mask_pattern",
];
/// The defaults of `vigil fit` (crates/cli/src/options.rs): the same fit from Python and the CLI.
const DEFAULT_VAL_FRACTION: f64 = 0.2;
const DEFAULT_MASK_PATTERN: &str = "{stem}_mask.png";

fn parse<T: std::str::FromStr>(key: &str, value: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e| anyhow!("{key}={value}: {e}"))
}

fn flag(key: &str, value: &str) -> Result<bool> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => bail!("{key} must be True or False, got {value}"),
    }
}

/// The pipeline options among `settings`; the others are left for the caller.
pub fn pipeline_options(settings: &[Setting]) -> Result<PipelineOptions> {
    let mut p = PipelineOptions::default();
    for (key, value) in settings.iter().filter(|(k, _)| PIPELINE_KEYS.contains(&k.as_str())) {
        match key.as_str() {
            "tile" => p.tile = Some(parse(key, value)?),
            "overlap" => p.overlap = Some(parse(key, value)?),
            "ignore" => p.ignore = Some(PathBuf::from(value)),
            "ignore_mode" => p.ignore_mode = Some(parse(key, value)?),
            "register" => p.register = Some(PathBuf::from(value)),
            "image_score" => p.image_score = Some(parse(key, value)?),
            "skip_bad" => {
                p.bad_files = if flag(key, value)? { BadFilePolicy::Skip } else { BadFilePolicy::Stop }
            }
            // Read by `training_filter`.
            "glob" => {}
            _ => unreachable!("every pipeline key is handled"),
        }
    }
    Ok(p)
}

/// Which training files are read from a folder (`glob`), as `vigil fit` reads them.
pub fn training_filter(settings: &[Setting]) -> ImageFilter {
    let glob = settings.iter().find(|(k, _)| k == "glob").map(|(_, v)| v.clone());
    ImageFilter { glob, recursive: false }
}

/// Everything `vigil.fit` needs, from its keyword arguments: fit options, pipeline options and the
/// method's own settings (any other name, checked by the method registry).
pub struct FitRequest {
    pub spec: MethodSpec,
    pub fit: FitOptions,
    pub pipeline: PipelineOptions,
    pub filter: ImageFilter,
}

pub fn fit_request(method: &str, settings: &[Setting]) -> Result<FitRequest> {
    let params: Vec<String> = settings
        .iter()
        .filter(|(k, _)| !PIPELINE_KEYS.contains(&k.as_str()) && !FIT_KEYS.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let spec = MethodSpec::parse(method, &params)?;
    let pipeline = pipeline_options(settings)?;
    let filter = training_filter(settings);
    let get = |name: &str| settings.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let fit_on_all = get("fit_on_all").map(|v| flag("fit_on_all", v)).transpose()?.unwrap_or(false);
    let val_fraction: Option<f64> = get("val_fraction").map(|v| parse("val_fraction", v)).transpose()?;
    if fit_on_all && val_fraction.is_some_and(|f| f > 0.0) {
        bail!("fit_on_all holds out no image: it cannot be combined with val_fraction");
    }
    let rule =
        |name: &str| -> Result<Option<ThresholdRule>> { get(name).map(|v| parse(name, v)).transpose() };
    let val_anomalous = match get("val_anomalous") {
        Some(dir) => {
            let dataset = vigil_data::dataset::Dataset::folders(
                None,
                None,
                Some(Path::new(dir)),
                get("val_masks").map(Path::new),
                get("mask_pattern").unwrap_or(DEFAULT_MASK_PATTERN),
            )?;
            vigil_engine::run::test_items(&dataset, &filter)
        }
        None if get("val_masks").is_some() => bail!("val_masks needs val_anomalous"),
        None => Vec::new(),
    };
    let fit = FitOptions {
        val_fraction: if fit_on_all { 0.0 } else { val_fraction.unwrap_or(DEFAULT_VAL_FRACTION) },
        fit_on_all,
        image_threshold: rule("threshold")?,
        pixel_threshold: rule("pixel_threshold")?,
        seed: get("seed").map(|v| parse("seed", v)).transpose()?.unwrap_or(0),
        checkpoint_dir: get("checkpoint_dir").map(PathBuf::from),
        val_anomalous,
    };
    Ok(FitRequest { spec, fit, pipeline, filter })
}

/// Fits as `vigil fit --method M --train T` with the same settings.
pub fn fit(method: &str, train: Option<&Path>, settings: &[Setting]) -> Result<Model> {
    let r = fit_request(method, settings)?;
    let paths = match train {
        Some(t) => vigil_engine::training_images(t, &r.filter)?,
        None if !r.spec.needs_training() => Vec::new(),
        None => bail!("train=<folder> is required: {} learns from normal images", r.spec.label()),
    };
    vigil_engine::fit(&r.spec, paths, &r.pipeline, r.fit)
}

/// Opens a model file; pipeline settings given here override the model's own, as on `vigil predict`.
pub fn load(path: &Path, allow_other_weights: bool, settings: &[Setting]) -> Result<Model> {
    if let Some((key, _)) = settings.iter().find(|(k, _)| !PIPELINE_KEYS.contains(&k.as_str()) || k == "glob")
    {
        bail!(
            "load() takes no setting '{key}': only the pipeline settings {} (and allow_other_weights)",
            PIPELINE_KEYS[..7].join(", ")
        );
    }
    Model::load(path, &LoadOptions { pipeline: pipeline_options(settings)?, allow_other_weights })
}

/// Pixels as NumPy holds them: row-major, channels last (interleaved).
pub struct Pixels<'a> {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub samples: Samples<'a>,
}

/// The sample types `model.score` accepts: integers are scaled by their range, as when decoding a
/// file; floats must already be in [0, 1].
pub enum Samples<'a> {
    U8(&'a [u8]),
    U16(&'a [u16]),
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// One image of an array, as `vigil_data::io::load_image` makes it from a file holding the same
/// pixels: planar, scaled to [0, 1]; a second (alpha) channel of gray and a fourth of colour are
/// dropped. `name` is used in messages.
pub fn image_from_pixels(p: &Pixels<'_>, name: &str) -> Result<Image> {
    let (keep, c) = match p.channels {
        1 | 2 => (1, p.channels),
        3 | 4 => (3, p.channels),
        n => bail!("{name}: {n} channels; give (H, W) gray, or (H, W, C) with C = 1, 2 (gray + alpha), 3 (RGB) or 4 (RGBA)"),
    };
    let n = p.height * p.width;
    fn planar<T: Copy>(src: &[T], n: usize, c: usize, keep: usize, f: impl Fn(T) -> f32) -> Vec<f32> {
        let mut out = vec![0f32; n * keep];
        for (i, px) in src.chunks_exact(c).enumerate() {
            for k in 0..keep {
                out[k * n + i] = f(px[k]);
            }
        }
        out
    }
    let len = match &p.samples {
        Samples::U8(s) => s.len(),
        Samples::U16(s) => s.len(),
        Samples::F32(s) => s.len(),
        Samples::F64(s) => s.len(),
    };
    if len != n * c {
        bail!("{name}: {len} samples for a {}x{}x{c} image", p.height, p.width);
    }
    let (data, bit_depth) = match &p.samples {
        Samples::U8(s) => (planar(s, n, c, keep, |v| v as f32 / 255.0), 8),
        Samples::U16(s) => (planar(s, n, c, keep, |v| v as f32 / 65535.0), 16),
        Samples::F32(s) => (planar(s, n, c, keep, |v| v), 32),
        Samples::F64(s) => (planar(s, n, c, keep, |v| v as f32), 32),
    };
    if let Some(i) = data.iter().position(|v| !(0.0..=1.0).contains(v)) {
        bail!(
            "{name}: float image has a value {} outside [0, 1] at x={}, y={}; normalise it to [0, 1] first \
             (or pass uint8/uint16 pixels)",
            data[i],
            i % p.width,
            (i / p.width) % p.height
        );
    }
    let mut image = Image::new(p.width, p.height, keep, data).map_err(|e| anyhow!("{name}: {e}"))?;
    image.bit_depth = bit_depth;
    Ok(image)
}

/// One image as `vigil predict` reports it.
pub struct Scoring {
    pub name: String,
    pub score: f32,
    /// The value compared with the image threshold (a log10 NFA for NFA thresholds).
    pub decided: f64,
    pub verdict: bool,
    pub map: Map,
    pub mask: Mask,
}

fn scoring(model: &Model, name: String, scored: vigil_engine::Scored) -> Scoring {
    let p = model.decide(scored);
    Scoring {
        name,
        score: p.scored.image_score,
        decided: p.decided,
        verdict: p.verdict,
        map: p.scored.map,
        mask: p.predicted,
    }
}

/// Scores decoded images one after the other (each uses every thread of the pool inside).
pub fn score_images(model: &Model, images: &[(String, Image)]) -> Result<Vec<Scoring>> {
    images.iter().map(|(name, image)| Ok(scoring(model, name.clone(), model.score(image, name)?))).collect()
}

/// Scores encoded image files held in memory (PNG, JPEG, TIFF, BMP bytes, as Ray's
/// `read_binary_files` or Spark's `binaryFile` give them), decoded exactly as `vigil predict`
/// decodes the files; `name` is used in messages.
pub fn score_encoded(model: &Model, blobs: &[(String, &[u8])]) -> Result<Vec<Scoring>> {
    blobs
        .iter()
        .map(|(name, bytes)| {
            let image = vigil_data::io::decode_image(Path::new(name), bytes)?;
            Ok(scoring(model, name.clone(), model.score(&image, name)?))
        })
        .collect()
}

/// Scores image files through the loop `vigil predict` runs (decoding beside scoring; a file
/// that cannot be read stops, or is skipped when the model was loaded with skip_bad=True).
/// Folders are searched as `vigil predict` searches them (recursively, image files sorted).
pub fn score_files(model: &Model, paths: &[PathBuf]) -> Result<(Vec<Scoring>, Vec<Skipped>)> {
    let filter = ImageFilter { glob: None, recursive: true };
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(filter.list(p)?);
        } else {
            files.push(p.clone());
        }
    }
    let items: Vec<Item> = files
        .iter()
        .map(|p| Item {
            path: p.clone(),
            name: p.display().to_string(),
            label: None,
            kind: String::new(),
            mask: None,
        })
        .collect();
    let mut out = Vec::with_capacity(items.len());
    let skipped = process_items(
        model.detector.as_ref(),
        &model.pipeline,
        &items,
        LoopOptions::default(),
        "score",
        |s| Ok(scoring(model, s.item.name.clone(), s.scored)),
        |event| {
            if let Event::Scored(s) = event {
                out.push(s);
            }
            Ok(())
        },
    )
    .with_context(|| format!("scoring {} file(s)", files.len()))?;
    Ok((out, skipped))
}

/// The value the decided quantity is compared with.
pub fn decision_threshold(model: &Model) -> f64 {
    vigil_engine::outputs::decision_threshold(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_routed_like_the_command_line_flags() {
        let s = |pairs: &[(&str, &str)]| -> Vec<Setting> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let r = fit_request(
            "acontrario",
            &s(&[
                ("feature", "gabor"),
                ("threshold", "max"),
                ("seed", "3"),
                ("skip_bad", "true"),
                ("tile", "64"),
            ]),
        )
        .unwrap();
        assert_eq!(r.spec.settings["feature"], "gabor");
        assert_eq!(r.fit.seed, 3);
        assert_eq!(r.fit.val_fraction, DEFAULT_VAL_FRACTION);
        assert!(r.fit.image_threshold.is_some());
        assert_eq!(r.pipeline.tile, Some(64));
        assert_eq!(r.pipeline.bad_files, BadFilePolicy::Skip);
        let err = fit_request("acontrario", &s(&[("no_such_setting", "1")])).err().unwrap().to_string();
        assert!(err.contains("no_such_setting"), "{err}");
        let err = fit_request("acontrario", &s(&[("fit_on_all", "true"), ("val_fraction", "0.3")]))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("fit_on_all"), "{err}");
        let err = fit_request("acontrario", &s(&[("threshold", "median")])).err().unwrap().to_string();
        assert!(err.contains("threshold=median"), "{err}");
    }

    #[test]
    fn pixels_become_the_image_a_file_of_them_decodes_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let rgb: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 13 % 256) as u8).collect();
        image_crate_png(&path, 5, 4, &rgb);
        let from_file = vigil_data::io::load_image(&path).unwrap();
        let pixels = Pixels { height: 4, width: 5, channels: 3, samples: Samples::U8(&rgb) };
        assert_eq!(image_from_pixels(&pixels, "a").unwrap(), from_file);

        let bad = [0.5f32, 1.5];
        let err =
            image_from_pixels(&Pixels { height: 1, width: 2, channels: 1, samples: Samples::F32(&bad) }, "b")
                .unwrap_err()
                .to_string();
        assert!(err.contains("outside [0, 1] at x=1, y=0"), "{err}");
        let err = image_from_pixels(
            &Pixels { height: 1, width: 1, channels: 5, samples: Samples::U8(&[0; 5]) },
            "c",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("5 channels"), "{err}");
    }

    fn image_crate_png(path: &Path, w: usize, h: usize, rgb: &[u8]) {
        image::RgbImage::from_raw(w as u32, h as u32, rgb.to_vec()).unwrap().save(path).unwrap();
    }
}
