//! Denoising diffusion for vigil's reconstruction methods (DDAD now; DAD and RIFA next): the
//! guided-diffusion U-Net with PyTorch parameter names ([`unet`]), the linear β schedule
//! ([`schedule`]), resumable ε-prediction training ([`train`]), and DDIM sampling with DDAD's
//! conditioned reconstruction ([`sampling`]). Every random draw comes from seeded ChaCha8
//! generators, so results are deterministic and a resumed training equals an uninterrupted one.

pub mod sampling;
pub mod schedule;
pub mod train;
pub mod unet;

pub use sampling::{
    ddim_denoise, ddim_update, gaussian, reconstruct, sample, skip_steps, DdimPlan, NoisePredictor,
    ReconstructionSettings,
};
pub use schedule::NoiseSchedule;
pub use train::{
    batch_indices, noise_prediction_loss, train_unet, TrainRun, TrainSettings, Trained, Trainer,
    TrainingImages,
};
pub use unet::{DropoutNoise, UNet, UNetSettings};
