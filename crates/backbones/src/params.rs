//! Where a network's parameters come from: a checkpoint (safetensors or PyTorch `.pth`, PyTorch
//! names and layouts) or a seeded random initialisation that records what it drew.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vigil_core::{Result, TensorBag, VigilError};

/// Hands out one named tensor of a known shape, as f32 in PyTorch layout.
pub(crate) trait Params {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
}

/// Tensors of a state dict; errors name the tensor and, when there is one, the file.
pub(crate) struct StateParams<'a> {
    pub bag: &'a TensorBag,
    pub origin: Option<&'a Path>,
}

impl Params for StateParams<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let found = match self.bag.shape(name) {
            Ok(found) => found,
            Err(_) => return Err(self.error(format!("tensor '{name}' (shape {shape:?}) is missing"))),
        };
        if found != shape {
            return Err(self.error(format!("tensor '{name}' has shape {found:?}, expected {shape:?}")));
        }
        self.bag.f32(name, Some(shape))
    }
}

impl StateParams<'_> {
    fn error(&self, message: String) -> VigilError {
        match self.origin {
            Some(path) => VigilError::file(path, message),
            None => VigilError::Model(message),
        }
    }
}

/// The tensors of a state that covers the network from its input up to some stage (a trained
/// [`crate::TrainableBackbone`]'s), the later ones seeded random: no feature up to that stage
/// depends on them. The state must be exactly such a prefix of the order the network asks for
/// its tensors in: a tensor found after the first missing one, or one never asked for, is an error.
pub(crate) struct PrefixParams<'a> {
    pub bag: &'a TensorBag,
    pub fallback: RandomParams,
    pub taken: std::collections::BTreeSet<String>,
    pub missing_since: Option<String>,
}

impl Params for PrefixParams<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if self.bag.shape(name).is_err() {
            self.missing_since.get_or_insert_with(|| name.to_string());
            return self.fallback.take(name, shape);
        }
        if let Some(missing) = &self.missing_since {
            return Err(VigilError::Model(format!(
                "tensor '{name}' is in the partial state but '{missing}', which comes before it, is not"
            )));
        }
        self.taken.insert(name.to_string());
        StateParams { bag: self.bag, origin: None }.take(name, shape)
    }
}

/// torchvision-like random initialisation. Batch-norm statistics are drawn away from the
/// identity so that folding them into the convolutions is exercised by tests.
pub(crate) struct RandomParams {
    rng: ChaCha8Rng,
    /// Box-Muller draws normals in pairs; the second waits here.
    spare_normal: Option<f32>,
    pub drawn: TensorBag,
}

impl RandomParams {
    pub fn new(seed: u64) -> RandomParams {
        RandomParams { rng: ChaCha8Rng::seed_from_u64(seed), spare_normal: None, drawn: TensorBag::new() }
    }

    fn normal(&mut self, std: f32) -> f32 {
        if let Some(z) = self.spare_normal.take() {
            return std * z;
        }
        // Box-Muller; 1 - u keeps the logarithm finite.
        let u: f32 = 1.0 - self.rng.gen::<f32>();
        let v: f32 = self.rng.gen();
        let radius = (-2.0 * u.ln()).sqrt();
        let (sin, cos) = (std::f32::consts::TAU * v).sin_cos();
        self.spare_normal = Some(radius * sin);
        std * radius * cos
    }
}

impl Params for RandomParams {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let len = shape.iter().product();
        let data: Vec<f32> = match (shape.len(), name.rsplit('.').next().unwrap_or("")) {
            // Convolution: Kaiming normal, fan-out mode (torchvision's ResNet/MobileNet choice).
            (4, _) => {
                let std = (2.0 / (shape[0] * shape[2] * shape[3]) as f32).sqrt();
                (0..len).map(|_| self.normal(std)).collect()
            }
            // Linear layer: uniform in +-1/sqrt(fan_in), as PyTorch's default.
            (2, _) => {
                let bound = 1.0 / (shape[1] as f32).sqrt();
                (0..len).map(|_| self.rng.gen_range(-bound..bound)).collect()
            }
            (_, "running_var") => (0..len).map(|_| self.rng.gen_range(0.5..1.5)).collect(),
            (_, "weight") => (0..len).map(|_| self.rng.gen_range(0.5..1.5)).collect(),
            _ => (0..len).map(|_| self.normal(0.1)).collect(),
        };
        self.drawn.put_f32(name, shape, data.clone());
        Ok(data)
    }
}

/// Reads a checkpoint by extension: `.safetensors`, or `.pth`/`.pt`/`.bin` through burn-store's
/// pure-Rust PyTorch reader (zip and legacy pickle formats).
pub(crate) fn read_checkpoint(path: &Path) -> Result<TensorBag> {
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match extension.as_str() {
        "pth" | "pt" | "bin" | "ckpt" => read_pytorch(path),
        _ => {
            let bytes = std::fs::read(path).map_err(|e| VigilError::io(path, e))?;
            TensorBag::from_safetensors(&bytes)
                .map_err(|e| VigilError::file(path, format!("not a readable safetensors file: {e}")))
        }
    }
}

fn read_pytorch(path: &Path) -> Result<TensorBag> {
    use burn::store::pytorch_reader::{DType, PytorchReader};
    let fail = |message: String| VigilError::file(path, message);
    let reader =
        PytorchReader::new(path).map_err(|e| fail(format!("not a readable PyTorch checkpoint: {e}")))?;
    let mut bag = TensorBag::new();
    for (name, tensor) in reader.tensors() {
        let bytes = tensor.read().map_err(|e| fail(format!("reading tensor '{name}': {e}")))?;
        let shape = tensor.shape().to_vec();
        let values: Vec<f32> = match tensor.dtype() {
            DType::F32 => {
                bytes.chunks_exact(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            DType::F64 => bytes
                .chunks_exact(8)
                .map(|b| f64::from_ne_bytes(b.try_into().expect("chunk of 8")) as f32)
                .collect(),
            DType::F16 => {
                bytes.chunks_exact(2).map(|b| f16_to_f32(u16::from_ne_bytes([b[0], b[1]]))).collect()
            }
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_ne_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            // Integer bookkeeping such as batch norm's `num_batches_tracked` is not a weight.
            _ => continue,
        };
        bag.put_f32(name, &shape, values);
    }
    Ok(bag)
}

/// IEEE half to single precision (exact; subnormals and infinities included).
fn f16_to_f32(bits: u16) -> f32 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exponent = ((bits >> 10) & 0x1f) as i32;
    let mantissa = (bits & 0x3ff) as f32;
    match exponent {
        0 => sign * mantissa * 2f32.powi(-24),
        31 if mantissa == 0.0 => sign * f32::INFINITY,
        31 => f32::NAN,
        _ => sign * (1.0 + mantissa / 1024.0) * 2f32.powi(exponent - 15),
    }
}

/// Writes a state dict (PyTorch names) as safetensors, atomically.
pub(crate) fn write_safetensors(state: &TensorBag, path: &Path) -> Result<()> {
    let bytes = state.to_safetensors()?;
    vigil_core::model_file::write_atomic(path, &bytes, true)
}

/// `<dir>/<kind>/<kind>.safetensors` under `VIGIL_WEIGHTS_DIR`, else under the shared weights
/// folder beside the workspace, if that file exists.
pub(crate) fn find_weights(file_stem: &str) -> Option<PathBuf> {
    let mut roots = Vec::new();
    if let Some(dir) = std::env::var_os("VIGIL_WEIGHTS_DIR") {
        roots.push(PathBuf::from(dir));
    }
    roots.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/weights"));
    roots
        .into_iter()
        .flat_map(|root| {
            [
                root.join(file_stem).join(format!("{file_stem}.safetensors")),
                root.join(format!("{file_stem}.safetensors")),
            ]
        })
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_decodes_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
    }

    #[test]
    fn missing_and_misshapen_tensors_are_named() {
        let mut bag = TensorBag::new();
        bag.put_f32("conv.weight", &[2, 1, 1, 1], vec![1.0, 2.0]);
        let path = Path::new("weights.safetensors");
        let mut params = StateParams { bag: &bag, origin: Some(path) };
        let err = params.take("conv.weight", &[3, 1, 1, 1]).unwrap_err().to_string();
        assert!(
            err.contains("weights.safetensors")
                && err.contains("conv.weight")
                && err.contains("[2, 1, 1, 1]")
        );
        let err = params.take("bn.bias", &[2]).unwrap_err().to_string();
        assert!(err.contains("bn.bias") && err.contains("missing"));
        assert_eq!(params.take("conv.weight", &[2, 1, 1, 1]).unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn legacy_pth_is_read_with_views_and_dtypes() {
        // Written by tests/fixtures/make_legacy_pth.py in torch's pre-1.6 non-zip format.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_legacy.pth");
        let bag = read_checkpoint(&path).unwrap();
        let names: Vec<&str> = bag.names().collect();
        assert_eq!(names, ["bn.running_mean", "bn.running_var", "conv.weight", "fc.weight", "half"]);
        let conv = bag.f32("conv.weight", Some(&[2, 1, 2, 2])).unwrap();
        assert_eq!(conv, (0..8).map(|i| i as f32).collect::<Vec<_>>());
        assert_eq!(bag.f32("bn.running_mean", Some(&[2])).unwrap(), [2.0, 3.0]);
        assert_eq!(bag.f32("fc.weight", Some(&[2, 3])).unwrap(), [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);
        assert_eq!(bag.f32("bn.running_var", Some(&[2])).unwrap(), [0.5, 2.0]);
        assert_eq!(bag.f32("half", Some(&[2])).unwrap(), [1.0, -2.0]);
        let err = read_checkpoint(&path.with_file_name("make_legacy_pth.py")).unwrap_err().to_string();
        assert!(err.contains("make_legacy_pth.py"), "{err}");
        let err = read_checkpoint(&path.with_file_name("absent.pth")).unwrap_err().to_string();
        assert!(err.contains("absent.pth"), "{err}");
    }

    #[test]
    fn random_params_are_seeded() {
        let a = RandomParams::new(7).take("x.weight", &[4, 2, 3, 3]).unwrap();
        let b = RandomParams::new(7).take("x.weight", &[4, 2, 3, 3]).unwrap();
        let c = RandomParams::new(8).take("x.weight", &[4, 2, 3, 3]).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Kaiming fan-out: std = sqrt(2 / (out * kh * kw)).
        let many = RandomParams::new(1).take("y.weight", &[8, 50, 5, 5]).unwrap();
        let std = (many.iter().map(|v| v * v).sum::<f32>() / many.len() as f32).sqrt();
        let mean = many.iter().sum::<f32>() / many.len() as f32;
        assert!((std - 0.1).abs() < 0.005 && mean.abs() < 0.005, "std {std}, mean {mean}");
    }
}
