//! Denoising diffusion for vigil's reconstruction methods (DDAD, RIFA, DAD): the
//! guided-diffusion U-Net with PyTorch parameter names ([`unet`]), the linear β schedule
//! ([`schedule`]), resumable ε-prediction training ([`train`]), DDIM sampling with DDAD's
//! conditioned reconstruction ([`sampling`]); and the score-SDE side of thesis chapter 7: VE and
//! VP SDEs with continuous denoising score matching ([`sde`]), resumable score training with a
//! moving average of the weights ([`score_train`]), the probability-flow ODE ([`ode`]) and the
//! predictor–corrector inpainter ([`inpaint`]). Every random draw comes from seeded ChaCha8
//! generators, so results are deterministic and a resumed training equals an uninterrupted one.

pub mod inpaint;
pub mod ode;
pub mod sampling;
pub mod schedule;
pub mod score_train;
pub mod sde;
pub mod train;
pub mod unet;

pub use inpaint::{inpaint, InpaintSettings};
pub use ode::{prior_neg_log_density, probability_flow_latent, FlowLatent, OdeSolver};
pub use sampling::{
    ddim_denoise, ddim_update, gaussian, reconstruct, sample, skip_steps, DdimPlan, NoisePredictor,
    ReconstructionSettings,
};
pub use schedule::NoiseSchedule;
pub use score_train::{train_score_net, ScoreTrainRun, ScoreTrainSettings, TrainedScore};
pub use sde::{score_matching_loss, ScoreModel, ScoreNet, Sde, T_EPS};
pub use train::{
    batch_indices, noise_prediction_loss, train_unet, TrainRun, TrainSettings, Trained, Trainer,
    TrainingImages,
};
pub use unet::{DropoutNoise, UNet, UNetSettings};
