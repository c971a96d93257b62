//! The model file: one file holding the method, its settings, thresholds and learned state.
//!
//! Layout: the 8-byte magic `VIGILMDL`, a little-endian u64 header length, a JSON header,
//! then the learned state as safetensors bytes. Files are written to a temporary sibling,
//! synced and renamed, so a crash never leaves a half-written model behind.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Result, TensorBag, Threshold, VigilError};

const MAGIC: &[u8; 8] = b"VIGILMDL";

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
}

pub struct ModelFile {
    pub header: ModelHeader,
    pub state: TensorBag,
}

impl ModelFile {
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = serde_json::to_vec_pretty(&self.header)
            .map_err(|e| VigilError::Model(format!("cannot encode model header: {e}")))?;
        let state = self.state.to_safetensors()?;
        let mut out = Vec::with_capacity(16 + header.len() + state.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&state);
        Ok(out)
    }

    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        if bytes.len() < 16 || &bytes[..8] != MAGIC {
            return Err(VigilError::file(
                path,
                "not a vigil model file (bad magic); was it written by `vigil fit`?",
            ));
        }
        let n = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
        if 16 + n > bytes.len() {
            return Err(VigilError::file(path, "model file is truncated (header runs past the end)"));
        }
        let header: ModelHeader = serde_json::from_slice(&bytes[16..16 + n])
            .map_err(|e| VigilError::file(path, format!("model header is not valid: {e}")))?;
        let state = TensorBag::from_safetensors(&bytes[16 + n..])
            .map_err(|e| VigilError::file(path, format!("model state is corrupt or truncated: {e}")))?;
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
}
