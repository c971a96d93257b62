//! The model file: one file holding the method, its settings, thresholds and learned state.
//!
//! Layout: the 8-byte magic `VIGILMD2`, a little-endian u64 header length, a JSON header, the
//! learned state as safetensors bytes, then the SHA-256 of everything before it, checked on
//! every read so flipped bytes or a partial copy are an error, never a silently different model.
//! Files are written to a temporary sibling, synced and renamed, so a crash never leaves a
//! half-written model behind.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fingerprint::WeightsFile;
use crate::{Result, TensorBag, Threshold, ThresholdKind, VigilError};

const MAGIC: &[u8; 8] = b"VIGILMD2";
/// The magic of model files from before the checksum and the weights fingerprints.
const MAGIC_V1: &[u8; 8] = b"VIGILMDL";
const CHECKSUM_LEN: usize = 32;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelHeader {
    /// Method name as the CLI knows it (`acontrario`, `patchcore`, ...).
    pub method: String,
    /// vigil version that wrote the file.
    pub vigil_version: String,
    /// Method settings, enough to rebuild the method before loading its state.
    pub settings: serde_json::Value,
    /// Pipeline settings the model was fitted with (tiling, ignore-mask mode, image-score reduction).
    pub pipeline: serde_json::Value,
    pub image_threshold: Option<Threshold>,
    pub pixel_threshold: Option<Threshold>,
    /// Free-form facts about the fit (number of images, time, seed).
    pub fit_info: serde_json::Value,
    /// The pretrained weights files the detector ran when it was fitted, checked at load time.
    pub weights: Vec<WeightsFile>,
}

impl ModelHeader {
    /// Thresholds must be finite: JSON cannot hold NaN or infinity, and no score compares
    /// meaningfully against them.
    fn check_thresholds(&self) -> Result<()> {
        for t in [&self.image_threshold, &self.pixel_threshold].into_iter().flatten() {
            let parameter = match t.kind {
                ThresholdKind::Quantile { p } => p,
                ThresholdKind::KSigma { k }
                | ThresholdKind::Nfa { k }
                | ThresholdKind::NfaCalibrated { k } => k,
                ThresholdKind::Max | ThresholdKind::F1Optimal | ThresholdKind::Fixed => 0.0,
            };
            if !t.value.is_finite() || !parameter.is_finite() {
                return Err(VigilError::Model(format!(
                    "the {:?} threshold ({}) is {}, not a finite number",
                    t.level, t.kind, t.value
                )));
            }
        }
        Ok(())
    }
}

pub struct ModelFile {
    pub header: ModelHeader,
    pub state: TensorBag,
}

impl ModelFile {
    /// The file's bytes. Non-finite thresholds or learned tensors are refused here, so no model
    /// that can only score nonsense (or cannot be read back) is ever written.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.header.check_thresholds()?;
        self.state.check_finite()?;
        let header = serde_json::to_vec_pretty(&self.header)
            .map_err(|e| VigilError::Model(format!("cannot encode model header: {e}")))?;
        let state = self.state.to_safetensors()?;
        let mut out = Vec::with_capacity(16 + header.len() + state.len() + CHECKSUM_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&state);
        let checksum = Sha256::digest(&out);
        out.extend_from_slice(&checksum);
        Ok(out)
    }

    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        if bytes.len() >= 8 && &bytes[..8] == MAGIC_V1 {
            return Err(VigilError::file(
                path,
                "model file from an older vigil (no checksum, no weights fingerprint); re-fit",
            ));
        }
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(VigilError::file(
                path,
                "not a vigil model file (bad magic); was it written by `vigil fit`?",
            ));
        }
        if bytes.len() < 16 + CHECKSUM_LEN {
            return Err(VigilError::file(path, "model file is corrupt or truncated (too short)"));
        }
        let (content, checksum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if Sha256::digest(content).as_slice() != checksum {
            return Err(VigilError::file(
                path,
                "model file is corrupt or truncated: its checksum does not match its content \
                 (changed bytes or an incomplete copy); restore it or re-fit",
            ));
        }
        let n = u64::from_le_bytes(content[8..16].try_into().expect("8 bytes")) as usize;
        if n > content.len() - 16 {
            return Err(VigilError::file(path, "model file is corrupt (header runs past the end)"));
        }
        let header: ModelHeader = serde_json::from_slice(&content[16..16 + n])
            .map_err(|e| VigilError::file(path, format!("model header is not valid: {e}")))?;
        let state = TensorBag::from_safetensors(&content[16 + n..])
            .map_err(|e| VigilError::file(path, format!("model state is corrupt or truncated: {e}")))?;
        header.check_thresholds().map_err(|e| VigilError::file(path, e.to_string()))?;
        state.check_finite().map_err(|e| VigilError::file(path, e.to_string()))?;
        Ok(ModelFile { header, state })
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| VigilError::io(path, e))?;
        Self::from_bytes(path, &bytes)
    }

    /// Writes atomically. An existing file is replaced only with `overwrite`.
    pub fn write(&self, path: &Path, overwrite: bool) -> Result<()> {
        write_atomic(path, &self.to_bytes()?, overwrite)
    }
}

/// Write `bytes` to `path` through a synced temporary sibling and a rename.
/// Refuses to replace an existing file unless `overwrite` is set.
pub fn write_atomic(path: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    if !overwrite && path.exists() {
        return Err(VigilError::file(path, "already exists; pass --overwrite to replace it"));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| VigilError::io(parent, e))?;
    }
    let file_name =
        path.file_name().ok_or_else(|| VigilError::file(path, "is not a file path"))?.to_string_lossy();
    let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| VigilError::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| VigilError::io(&tmp, e))?;
        f.sync_all().map_err(|e| VigilError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| VigilError::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ThresholdKind, ThresholdLevel};

    fn sample() -> ModelFile {
        let mut state = TensorBag::new();
        state.put_f32("mean", &[3], vec![1.0, 2.0, 3.0]);
        ModelFile {
            header: ModelHeader {
                method: "test".into(),
                vigil_version: "0".into(),
                settings: serde_json::json!({"a": 1}),
                pipeline: serde_json::json!({}),
                image_threshold: Some(Threshold {
                    kind: ThresholdKind::Quantile { p: 0.99 },
                    level: ThresholdLevel::Image,
                    value: 0.5,
                    n_samples: 10,
                }),
                pixel_threshold: None,
                fit_info: serde_json::json!({}),
                weights: vec![WeightsFile { path: "w.safetensors".into(), sha256: "ab".repeat(32) }],
            },
            state,
        }
    }

    #[test]
    fn round_trip_and_refuse_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.vigil");
        sample().write(&p, false).unwrap();
        let back = ModelFile::read(&p).unwrap();
        assert_eq!(back.header.method, "test");
        assert_eq!(back.state.f32("mean", Some(&[3])).unwrap(), vec![1.0, 2.0, 3.0]);
        let err = sample().write(&p, false).unwrap_err().to_string();
        assert!(err.contains("--overwrite"), "{err}");
        sample().write(&p, true).unwrap();
    }

    #[test]
    fn truncated_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.vigil");
        let bytes = sample().to_bytes().unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
        let err = ModelFile::read(&p).err().unwrap().to_string();
        assert!(err.contains("m.vigil") && err.contains("corrupt or truncated"), "{err}");
        std::fs::write(&p, b"hello").unwrap();
        assert!(ModelFile::read(&p).err().unwrap().to_string().contains("not a vigil model"));
    }

    #[test]
    fn any_flipped_byte_is_detected_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("flipped.vigil");
        let bytes = sample().to_bytes().unwrap();
        ModelFile::from_bytes(&p, &bytes).unwrap();
        // Every byte after the magic: header length, JSON header, tensors, checksum.
        for i in 8..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x10;
            let err = ModelFile::from_bytes(&p, &flipped).err().map(|e| e.to_string());
            let err = err.unwrap_or_else(|| panic!("a flipped byte {i} of {} loaded", bytes.len()));
            assert!(err.contains("flipped.vigil") && err.contains("checksum"), "byte {i}: {err}");
        }
    }

    #[test]
    fn files_of_the_older_format_ask_for_a_refit() {
        let mut old = b"VIGILMDL".to_vec();
        old.extend_from_slice(&2u64.to_le_bytes());
        old.extend_from_slice(b"{}");
        let err = ModelFile::from_bytes(Path::new("old.vigil"), &old).err().unwrap().to_string();
        assert!(err.contains("old.vigil") && err.contains("older vigil") && err.contains("re-fit"), "{err}");
    }

    #[test]
    fn non_finite_thresholds_and_tensors_are_refused_at_save() {
        let mut nan_threshold = sample();
        nan_threshold.header.image_threshold.as_mut().unwrap().value = f64::NAN;
        let err = nan_threshold.to_bytes().err().unwrap().to_string();
        assert!(err.contains("threshold") && err.contains("NaN"), "{err}");
        let mut infinite = sample();
        infinite.header.pixel_threshold = Some(Threshold {
            kind: ThresholdKind::Fixed,
            level: ThresholdLevel::Pixel,
            value: f64::INFINITY,
            n_samples: 0,
        });
        assert!(infinite.to_bytes().is_err());
        let mut nan_state = sample();
        nan_state.state.put_f32("mean", &[3], vec![1.0, f32::NAN, 3.0]);
        let err = nan_state.to_bytes().err().unwrap().to_string();
        assert!(err.contains("'mean'") && err.contains("non-finite"), "{err}");
    }
}
