//! Training checkpoints: everything a killed run needs to continue to the same weights as an
//! uninterrupted one — weights (with BatchNorm running statistics), optimiser state, the
//! schedule, the step, the seed and the RNG position — in one file written atomically.
//!
//! File layout: the magic line, then three length-prefixed (u64 little-endian) sections: a JSON
//! header, the weights as safetensors, and the optimiser states (each length-prefixed).

use std::path::Path;

use burn::optim::ModuleOptimizer;
use burn::tensor::Bytes;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use vigil_core::model_file::write_atomic;
use vigil_core::{Result, TensorBag, VigilError};

use crate::schedule::LrSchedule;

const MAGIC: &[u8] = b"VIGIL-CHECKPOINT 1\n";

/// Where a ChaCha8 generator stands: seed, stream and word position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: [u8; 32],
    pub stream: u64,
    /// u128 as a decimal string: JSON numbers cannot hold it.
    pub word_pos: String,
}

impl RngState {
    pub fn capture(rng: &ChaCha8Rng) -> Self {
        RngState { seed: rng.get_seed(), stream: rng.get_stream(), word_pos: rng.get_word_pos().to_string() }
    }

    pub fn restore(&self) -> Result<ChaCha8Rng> {
        use rand::SeedableRng;
        let pos: u128 = self.word_pos.parse().map_err(|_| {
            VigilError::Model(format!("checkpoint RNG position '{}' is not a number", self.word_pos))
        })?;
        let mut rng = ChaCha8Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(pos);
        Ok(rng)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Header {
    step: usize,
    seed: u64,
    rng: Option<RngState>,
    schedule: Option<LrSchedule>,
    meta: serde_json::Value,
}

/// A resumable training state.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Optimiser steps completed.
    pub step: usize,
    pub seed: u64,
    /// RNG position for trainers that draw from one running generator. Trainers whose
    /// randomness is a pure function of (seed, step) leave it `None`.
    pub rng: Option<RngState>,
    pub schedule: Option<LrSchedule>,
    /// Method-specific state: settings to check against, loss history, early-stopping counters.
    pub meta: serde_json::Value,
    pub weights: TensorBag,
    /// Serialised optimiser states (see [`optimizer_bytes`]), one per optimiser.
    pub optimizers: Vec<Vec<u8>>,
}

fn push_section(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn take_section<'a>(path: &Path, bytes: &mut &'a [u8], what: &str) -> Result<&'a [u8]> {
    let truncated = || VigilError::file(path, format!("checkpoint is truncated (in its {what})"));
    if bytes.len() < 8 {
        return Err(truncated());
    }
    let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    if bytes.len() - 8 < len {
        return Err(truncated());
    }
    let section = &bytes[8..8 + len];
    *bytes = &bytes[8 + len..];
    Ok(section)
}

impl Checkpoint {
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = Header {
            step: self.step,
            seed: self.seed,
            rng: self.rng.clone(),
            schedule: self.schedule.clone(),
            meta: self.meta.clone(),
        };
        let json =
            serde_json::to_vec(&header).map_err(|e| VigilError::Model(format!("checkpoint header: {e}")))?;
        let mut out = MAGIC.to_vec();
        push_section(&mut out, &json);
        push_section(&mut out, &self.weights.to_safetensors()?);
        let mut optim = Vec::new();
        for o in &self.optimizers {
            push_section(&mut optim, o);
        }
        push_section(&mut out, &optim);
        Ok(out)
    }

    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let mut rest = bytes
            .strip_prefix(MAGIC)
            .ok_or_else(|| VigilError::file(path, "is not a vigil training checkpoint"))?;
        let json = take_section(path, &mut rest, "header")?;
        let header: Header = serde_json::from_slice(json)
            .map_err(|e| VigilError::file(path, format!("checkpoint header is not valid: {e}")))?;
        let weights = TensorBag::from_safetensors(take_section(path, &mut rest, "weights")?)
            .map_err(|e| VigilError::file(path, format!("checkpoint weights: {e}")))?;
        let mut optim = take_section(path, &mut rest, "optimiser state")?;
        let mut optimizers = Vec::new();
        while !optim.is_empty() {
            optimizers.push(take_section(path, &mut optim, "optimiser state")?.to_vec());
        }
        Ok(Checkpoint {
            step: header.step,
            seed: header.seed,
            rng: header.rng,
            schedule: header.schedule,
            meta: header.meta,
            weights,
            optimizers,
        })
    }

    /// Write through a temporary file and a rename, so a kill mid-write leaves the previous
    /// checkpoint intact.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_bytes()?, true)
    }

    /// The checkpoint at `path`, or `None` when there is none yet.
    pub fn read_if_exists(path: &Path) -> Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(Self::from_bytes(path, &bytes)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(VigilError::io(path, e)),
        }
    }
}

/// The optimiser's state (moments and step counts per parameter) as bytes (burnpack).
pub fn optimizer_bytes(optimizer: &ModuleOptimizer) -> Result<Vec<u8>> {
    let bytes =
        optimizer.into_bytes().map_err(|e| VigilError::Model(format!("saving optimiser state: {e}")))?;
    Ok(bytes.to_vec())
}

/// Restore a state saved by [`optimizer_bytes`] into a freshly built optimiser of the same kind.
/// Parameter ids must be stable across processes ([`crate::stable_param_ids`]).
pub fn restore_optimizer(optimizer: ModuleOptimizer, bytes: &[u8]) -> Result<ModuleOptimizer> {
    optimizer
        .from_bytes(Bytes::from_bytes_vec(bytes.to_vec()))
        .map_err(|e| VigilError::Model(format!("checkpoint optimiser state: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    #[test]
    fn round_trip_and_rng_position() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        rng.next_u64();
        let mut weights = TensorBag::new();
        weights.put_f32("w", &[2], vec![1.5, -2.0]);
        let ck = Checkpoint {
            step: 17,
            seed: 3,
            rng: Some(RngState::capture(&rng)),
            schedule: Some(LrSchedule::draem(1e-4, 100, 0.2)),
            meta: serde_json::json!({"losses": [1.0, 0.5]}),
            weights,
            optimizers: vec![vec![1, 2, 3], vec![]],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.ckpt");
        assert!(Checkpoint::read_if_exists(&path).unwrap().is_none());
        ck.write(&path).unwrap();
        let back = Checkpoint::read_if_exists(&path).unwrap().unwrap();
        assert_eq!(back, ck);
        let mut resumed = back.rng.unwrap().restore().unwrap();
        assert_eq!(resumed.next_u64(), rng.next_u64());

        let bytes = std::fs::read(&path).unwrap();
        let err = Checkpoint::from_bytes(&path, &bytes[..bytes.len() - 3]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        assert!(Checkpoint::from_bytes(&path, b"garbage").is_err());
    }

    #[test]
    fn adam_state_survives_a_rebuilt_network() {
        use crate::{init_normal, load_module, module_to_bag, stable_param_ids, training_device};
        use burn::nn::conv::{Conv2d, Conv2dConfig};
        use burn::optim::GradientsParams;
        use burn::tensor::Tensor;

        let device = training_device();
        let fresh = || stable_param_ids(init_normal(Conv2dConfig::new([2, 2], [3, 3]).init(&device), 1, 0.5));
        let x = Tensor::<4>::ones([1, 2, 5, 5], &device);
        let step = |net: Conv2d, opt: &mut ModuleOptimizer| {
            let loss = net.forward(x.clone()).powf_scalar(2.0).mean();
            let grads = GradientsParams::from_grads(loss.backward(), &net);
            opt.step(1e-2, net, grads)
        };
        let mut opt = crate::adam(0.0);
        let net = step(fresh(), &mut opt);
        let saved_weights = module_to_bag(&net);
        let saved_optim = optimizer_bytes(&opt).unwrap();
        let continued = step(net, &mut opt);

        // Rebuilt from scratch as another process would: new modules, new optimiser.
        let mut opt2 = restore_optimizer(crate::adam(0.0), &saved_optim).unwrap();
        let rebuilt = load_module(fresh(), &saved_weights, "").unwrap();
        let resumed = step(rebuilt, &mut opt2);
        assert_eq!(module_to_bag(&resumed), module_to_bag(&continued));

        // Without the optimiser state the second step differs (Adam's moments matter).
        let mut cold = crate::adam(0.0);
        let restarted = step(load_module(fresh(), &saved_weights, "").unwrap(), &mut cold);
        assert_ne!(module_to_bag(&restarted), module_to_bag(&continued));
    }
}
