//! The [`Model`]: a detector, the pipeline it was fitted with and its two thresholds — what both
//! [`crate::fit()`] and [`Model::load`] return, and what every front end scores with.

use std::path::Path;

use anyhow::{Context, Result};
use vigil_core::model_file::ModelHeader;
use vigil_core::{Detector, Image, Mask, ModelFile, Threshold};

use crate::pipeline::{Pipeline, PipelineOptions, Scored, IGNORE_TENSOR, REFERENCE_TENSOR};
use crate::registry;

pub struct Model {
    /// The method's name in the registry.
    pub method: String,
    pub settings: serde_json::Value,
    pub detector: Box<dyn Detector>,
    pub pipeline: Pipeline,
    pub image_threshold: Threshold,
    pub pixel_threshold: Threshold,
    /// Facts about the fit (images, seed, time), as stored in the model file.
    pub fit_info: serde_json::Value,
    /// Pretrained weights the detector ran when it was fitted.
    pub weights: Vec<vigil_core::WeightsFile>,
}

/// How to open a model file.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Pipeline options given now; they override the model's own (with a warning).
    pub pipeline: PipelineOptions,
    /// Score even when the pretrained weights differ from those the model was fitted with.
    pub allow_other_weights: bool,
}

impl Model {
    /// Opens a model file: checks it, rebuilds its detector and pipeline.
    pub fn load(path: &Path, options: &LoadOptions) -> Result<Model> {
        let file = ModelFile::read(path)?;
        let h = &file.header;
        let detector = registry::load(&h.method, &h.settings, &file.state)
            .with_context(|| format!("{}", path.display()))?;
        vigil_core::fingerprint::check_weights(
            path,
            &h.weights,
            &detector.weights_files(),
            options.allow_other_weights,
        )?;
        let pipeline = Pipeline::from_model(&file, &options.pipeline)?;
        let missing = |level| format!("{}: the model file has no {level} threshold", path.display());
        Ok(Model {
            method: h.method.clone(),
            settings: h.settings.clone(),
            image_threshold: h.image_threshold.clone().with_context(|| missing("image"))?,
            pixel_threshold: h.pixel_threshold.clone().with_context(|| missing("pixel"))?,
            fit_info: h.fit_info.clone(),
            weights: h.weights.clone(),
            detector,
            pipeline,
        })
    }

    /// The model as a file: header, learned state and the pipeline's own tensors.
    pub fn to_file(&self) -> Result<ModelFile> {
        let mut state = self.detector.state()?;
        if let Some((reference, _)) = &self.pipeline.registration {
            state.put_f32(
                REFERENCE_TENSOR,
                &[reference.channels, reference.height, reference.width],
                reference.data.clone(),
            );
        }
        if let Some(m) = &self.pipeline.ignore {
            state.put_f32(
                IGNORE_TENSOR,
                &[m.height, m.width],
                m.data.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect(),
            );
        }
        let header = ModelHeader {
            method: self.method.clone(),
            vigil_version: env!("CARGO_PKG_VERSION").to_string(),
            settings: self.settings.clone(),
            pipeline: serde_json::to_value(&self.pipeline.settings)?,
            image_threshold: Some(self.image_threshold.clone()),
            pixel_threshold: Some(self.pixel_threshold.clone()),
            fit_info: self.fit_info.clone(),
            weights: self.weights.clone(),
        };
        Ok(ModelFile { header, state })
    }

    /// Writes the model file. Without `overwrite` an existing file is never replaced, not even one
    /// created by another process while this one was writing.
    pub fn save(&self, path: &Path, overwrite: bool) -> Result<()> {
        crate::outputs::write_file(path, &self.to_file()?.to_bytes()?, overwrite)
    }

    /// Scores one image as loaded from its file; `name` is used in messages.
    pub fn score(&self, image: &Image, name: &str) -> Result<Scored> {
        self.pipeline.score(self.detector.as_ref(), image, name)
    }

    /// Is the image anomalous? For NFA thresholds the decision reads the NFA map.
    pub fn image_verdict(&self, scored: &Scored) -> bool {
        image_decision(scored, &self.image_threshold)
    }

    /// The pixels flagged as anomalous.
    pub fn pixel_verdicts(&self, scored: &Scored) -> Mask {
        pixel_decisions(scored, &self.pixel_threshold)
    }

    /// The value the image threshold is compared with: the most significant log10 NFA for NFA
    /// thresholds, else the image score.
    pub fn decided_value(&self, scored: &Scored) -> f64 {
        decided_value(scored, &self.image_threshold)
    }

    /// Scores one decoded image and decides on it: what `vigil predict` writes for an image and
    /// the server answers, from this one function so both give the same numbers.
    pub fn predict(&self, image: &Image, name: &str) -> Result<Prediction> {
        Ok(self.decide(self.score(image, name)?))
    }

    /// The decisions on an image scored by the pipeline.
    pub fn decide(&self, scored: Scored) -> Prediction {
        Prediction {
            decided: self.decided_value(&scored),
            verdict: self.image_verdict(&scored),
            threshold: self.image_threshold.log10_nfa_level().unwrap_or(self.image_threshold.value),
            predicted: self.pixel_verdicts(&scored),
            scored,
        }
    }
}

/// One image as `vigil predict` reports it.
pub struct Prediction {
    pub scored: Scored,
    /// The value compared with the image threshold ([`Model::decided_value`]).
    pub decided: f64,
    /// True when the image is anomalous.
    pub verdict: bool,
    /// The value `decided` is compared with (for NFA thresholds, a log10 NFA level).
    pub threshold: f64,
    /// The pixels flagged as anomalous.
    pub predicted: Mask,
}

pub(crate) fn decided_value(scored: &Scored, t: &Threshold) -> f64 {
    match (t.log10_nfa_level(), &scored.log10_nfa) {
        (Some(_), Some(nfa)) => nfa.min() as f64,
        _ => scored.image_score as f64,
    }
}

/// Is `score` above the threshold? For NFA thresholds the decision reads the NFA map.
pub(crate) fn pixel_decisions(scored: &Scored, t: &Threshold) -> Mask {
    let data = match (t.log10_nfa_level(), &scored.log10_nfa) {
        (Some(level), Some(nfa)) => nfa.data.iter().map(|&v| (v as f64) <= level).collect(),
        _ => scored.map.data.iter().map(|&v| (v as f64) > t.value).collect(),
    };
    Mask { width: scored.map.width, height: scored.map.height, data }
}

pub(crate) fn image_decision(scored: &Scored, t: &Threshold) -> bool {
    match (t.log10_nfa_level(), &scored.log10_nfa) {
        (Some(level), Some(_)) => decided_value(scored, t) <= level,
        _ => (scored.image_score as f64) > t.value,
    }
}
