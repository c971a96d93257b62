//! Fingerprints that tie saved state to what produced it: the training images a checkpoint was
//! written for, the weights files a model was fitted with. All are SHA-256 digests in hex.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Image, Result, VigilError};

/// The SHA-256 of `bytes`, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The SHA-256 of a file's content, read in blocks (weights files run to hundreds of MB).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| VigilError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut block).map_err(|e| VigilError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&block[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a training set is: where it comes from (for messages), how many images, and a digest of
/// their content. Two sets are the same data when count and digest agree, wherever they lie.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    /// The folder the images come from (or a description of an in-memory set).
    pub origin: String,
    pub images: usize,
    /// SHA-256 over every image's name, size and content, in order, and the delivery options.
    pub sha256: String,
}

impl DataFingerprint {
    pub fn same_data(&self, other: &DataFingerprint) -> bool {
        self.images == other.images && self.sha256 == other.sha256
    }
}

impl fmt::Display for DataFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short = &self.sha256[..self.sha256.len().min(12)];
        write!(f, "{} ({} images, sha256 {short}…)", self.origin, self.images)
    }
}

/// Builds a [`DataFingerprint`] from decoded images, for image sets that are not plain files.
pub struct ImageSetHasher {
    hasher: Sha256,
    images: usize,
}

impl Default for ImageSetHasher {
    fn default() -> Self {
        ImageSetHasher { hasher: Sha256::new(), images: 0 }
    }
}

impl ImageSetHasher {
    pub fn add(&mut self, image: &Image) {
        for n in [image.width, image.height, image.channels] {
            self.hasher.update((n as u64).to_le_bytes());
        }
        for v in &image.data {
            self.hasher.update(v.to_bits().to_le_bytes());
        }
        self.images += 1;
    }

    pub fn finish(self, origin: String) -> DataFingerprint {
        DataFingerprint { origin, images: self.images, sha256: hex(&self.hasher.finalize()) }
    }
}

/// A weights file and the SHA-256 of its content when it was opened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightsFile {
    pub path: PathBuf,
    pub sha256: String,
}

impl WeightsFile {
    pub fn read(path: &Path) -> Result<WeightsFile> {
        Ok(WeightsFile { path: path.to_path_buf(), sha256: sha256_file(path)? })
    }
}

impl fmt::Display for WeightsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (sha256 {})", self.path.display(), self.sha256)
    }
}

/// Checks that the weights files a detector uses now are those a model was fitted with
/// (`fitted`, from the model file `model`): same number, same content, in the same order. A
/// mismatch is an error naming both files, unless `allow_other` is set, when it is a warning.
pub fn check_weights(
    model: &Path,
    fitted: &[WeightsFile],
    now: &[WeightsFile],
    allow_other: bool,
) -> Result<()> {
    let describe = |files: &[WeightsFile]| match files {
        [] => "no weights file".to_string(),
        _ => files.iter().map(|w| w.to_string()).collect::<Vec<_>>().join(" and "),
    };
    let same = fitted.len() == now.len() && fitted.iter().zip(now).all(|(a, b)| a.sha256 == b.sha256);
    if same {
        return Ok(());
    }
    let message = format!(
        "was fitted with the weights {} but the weights now loaded are {}",
        describe(fitted),
        describe(now)
    );
    if allow_other {
        eprintln!("warning: {}: {message}; scoring anyway (--allow-other-weights)", model.display());
        return Ok(());
    }
    Err(VigilError::file(
        model,
        format!(
            "{message}; its scores and thresholds belong to the first; re-fit, or pass --allow-other-weights"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_the_standard_vector() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(sha256_file(&path).unwrap(), sha256_hex(b"abc"));
        assert!(sha256_file(&dir.path().join("absent")).unwrap_err().to_string().contains("absent"));
    }

    #[test]
    fn weights_mismatch_names_both_files_unless_allowed() {
        let a = WeightsFile { path: "fit/w.safetensors".into(), sha256: "aa".into() };
        let b = WeightsFile { path: "now/w.safetensors".into(), sha256: "bb".into() };
        let model = Path::new("m.vigil");
        check_weights(model, std::slice::from_ref(&a), std::slice::from_ref(&a), false).unwrap();
        let moved = WeightsFile { path: "elsewhere.safetensors".into(), ..a.clone() };
        check_weights(model, std::slice::from_ref(&a), &[moved], false).unwrap();
        let err = check_weights(model, std::slice::from_ref(&a), std::slice::from_ref(&b), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m.vigil") && err.contains("fit/w.safetensors") && err.contains("now/w.safetensors"),
            "{err}"
        );
        assert!(err.contains("--allow-other-weights"), "{err}");
        check_weights(model, std::slice::from_ref(&a), &[b], true).unwrap();
        assert!(check_weights(model, &[a], &[], false).is_err());
    }

    #[test]
    fn image_sets_differ_by_any_pixel() {
        let image = Image::new(2, 1, 1, vec![0.25, 0.5]).unwrap();
        let mut changed = image.clone();
        changed.data[1] = 0.75;
        let digest = |images: &[&Image]| {
            let mut h = ImageSetHasher::default();
            images.iter().for_each(|i| h.add(i));
            h.finish("set".into())
        };
        assert!(digest(&[&image]).same_data(&digest(&[&image])));
        assert!(!digest(&[&image]).same_data(&digest(&[&changed])));
        assert!(!digest(&[&image]).same_data(&digest(&[&image, &image])));
    }
}
