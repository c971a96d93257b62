//! MAE with a sliding 2×2-patch mask (seed 002: Dini and Rahtu, "Detecting Anomalies in Textured
//! Images Using Modified Transformer Masked Autoencoder"; the network is He et al. 2022's MAE,
//! facebookresearch/mae `models_mae.py`).
//!
//! - [`model`]: the ViT masked autoencoder ([`Mae`]) with the official parameter names, its
//!   seeded official initialisation and the masked loss.
//! - [`sliding`]: the s × s complementary masks and the composite reconstruction.
//! - [`anomaly`]: the seed's map (SSIM + L1, smoothing, opening) and mean score.
//! - [`train`]: resumable MAE pre-training on the normal images.
//! - [`settings`]: [`MaeSettings`] and the `cpu` / `vit_base` / `vit_large` presets.
//! - [`detector`]: [`MaeDetector`], the vigil [`Detector`](vigil_core::Detector).

pub mod anomaly;
pub mod detector;
pub mod model;
pub mod settings;
pub mod sliding;
pub mod train;

pub use detector::MaeDetector;
pub use model::{init_state, masked_loss, Mae, MaeArch, MaskPlan};
pub use settings::{MaeSettings, Preset};
