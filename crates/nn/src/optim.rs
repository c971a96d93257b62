//! Optimiser construction from serialisable settings.

use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamConfig, AdamWConfig, ModuleOptimizer};
use serde::{Deserialize, Serialize};

/// Which Adam flavour and its constants. Defaults follow PyTorch (betas 0.9/0.999, eps 1e-8),
/// not burn (eps 1e-5), so a method ported from a PyTorch reference trains the same way.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerSettings {
    /// `true`: AdamW (decoupled decay); `false`: Adam with L2 weight decay added to the gradient.
    pub decoupled: bool,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    /// AMSGrad: divide by the running maximum of the second moment (PyTorch `amsgrad=True`).
    #[serde(default)]
    pub amsgrad: bool,
}

impl Default for OptimizerSettings {
    fn default() -> Self {
        OptimizerSettings {
            decoupled: false,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            amsgrad: false,
        }
    }
}

impl OptimizerSettings {
    pub fn build(&self) -> ModuleOptimizer {
        if self.decoupled {
            AdamWConfig::new()
                .with_beta_1(self.beta1)
                .with_beta_2(self.beta2)
                .with_epsilon(self.epsilon)
                .with_weight_decay(self.weight_decay)
                .with_amsgrad(self.amsgrad)
                .init()
        } else {
            AdamConfig::new()
                .with_beta_1(self.beta1)
                .with_beta_2(self.beta2)
                .with_epsilon(self.epsilon)
                .with_weight_decay(
                    (self.weight_decay > 0.0).then(|| WeightDecayConfig::new(self.weight_decay)),
                )
                .with_amsgrad(self.amsgrad)
                .init()
        }
    }
}

/// Adam (PyTorch constants) with optional L2 weight decay.
pub fn adam(weight_decay: f32) -> ModuleOptimizer {
    OptimizerSettings { weight_decay, ..Default::default() }.build()
}

/// AdamW (PyTorch constants) with decoupled weight decay.
pub fn adamw(weight_decay: f32) -> ModuleOptimizer {
    OptimizerSettings { decoupled: true, weight_decay, ..Default::default() }.build()
}
