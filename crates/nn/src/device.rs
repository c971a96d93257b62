//! Where tensors live: the pure-Rust flex CPU backend by default, a GPU by build feature.

use burn::tensor::Device;

/// The inference device: CUDA with feature `cuda`, wgpu with feature `wgpu`, else flex (CPU).
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        Device::cuda(0)
    }
    #[cfg(all(feature = "wgpu", not(feature = "cuda")))]
    {
        Device::wgpu(Default::default())
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        Device::flex()
    }
}

/// The same device with gradients recorded, for training.
pub fn training_device() -> Device {
    default_device().autodiff()
}
