//! vigil's deep-learning engine on burn: what burn does not give directly and every trained
//! method needs — differentiable SSIM and focal loss, optimiser and schedule helpers,
//! deterministic weight initialisation, PyTorch-named weight exchange with a [`TensorBag`],
//! exact-resume checkpoints and a small training loop.
//!
//! Layers (Conv2d, BatchNorm, pooling, interpolation, activations) are burn's own; they are
//! re-exported here so methods depend on one engine crate. [`kernels`] runs convolutions
//! (plain, depthwise, transposed, pointwise 1-D), BatchNorm + activation, GroupNorm (+ SiLU),
//! scaled softmax, nearest up-sampling and 2x2 average pooling on the CPU by vigil's own
//! training kernels, as burn operations.
//!
//! [`TensorBag`]: vigil_core::TensorBag

pub mod checkpoint;
pub mod device;
pub mod init;
pub mod kernels;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod state;
pub mod train;

#[cfg(test)]
pub(crate) mod test_modules;

pub use burn;
pub use checkpoint::{optimizer_bytes, restore_optimizer, Checkpoint, RngState};
pub use device::{default_device, training_device};
pub use init::{init_normal, stable_param_ids};
pub use loss::{focal_loss, focal_loss_map, l1_loss, l2_loss, ssim, ssim_loss};
pub use optim::{adam, adamw, OptimizerSettings};
pub use schedule::LrSchedule;
pub use state::{load_module, module_to_bag, tensor_from_vec, tensor_to_vec};
pub use train::{run_training, LoopConfig, LoopOutcome, LoopState, TrainTask};
