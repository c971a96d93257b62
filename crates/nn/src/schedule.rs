//! Learning-rate schedules as pure functions of the step, so a resumed run needs only the step.

use serde::{Deserialize, Serialize};
use vigil_core::{Result, VigilError};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    Constant {
        lr: f64,
    },
    /// `lr * gamma^(step / every)`.
    Step {
        lr: f64,
        every: usize,
        gamma: f64,
    },
    /// `lr * gamma^(number of milestones <= step)` (PyTorch's MultiStepLR).
    MultiStep {
        lr: f64,
        milestones: Vec<usize>,
        gamma: f64,
    },
}

impl LrSchedule {
    /// DRAEM's schedule: multiply by `gamma` at 80 % and 90 % of `total_steps`.
    pub fn draem(lr: f64, total_steps: usize, gamma: f64) -> Self {
        let at = |f: f64| ((total_steps as f64) * f).round() as usize;
        LrSchedule::MultiStep { lr, milestones: vec![at(0.8), at(0.9)], gamma }
    }

    /// The learning rate used for optimiser step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        match self {
            LrSchedule::Constant { lr } => *lr,
            LrSchedule::Step { lr, every, gamma } => lr * gamma.powi((step / (*every).max(1)) as i32),
            LrSchedule::MultiStep { lr, milestones, gamma } => {
                lr * gamma.powi(milestones.iter().filter(|&&m| m <= step).count() as i32)
            }
        }
    }

    pub fn validate(&self) -> Result<()> {
        let (lr, gamma) = match self {
            LrSchedule::Constant { lr } => (*lr, 1.0),
            LrSchedule::Step { lr, every, gamma } => {
                if *every == 0 {
                    return Err(VigilError::Config("step schedule: 'every' must be at least 1".into()));
                }
                (*lr, *gamma)
            }
            LrSchedule::MultiStep { lr, gamma, .. } => (*lr, *gamma),
        };
        if !(lr.is_finite() && lr > 0.0 && gamma.is_finite() && gamma > 0.0) {
            return Err(VigilError::Config(format!("learning rate {lr} and gamma {gamma} must be positive")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multistep_drops_at_80_and_90_percent() {
        let s = LrSchedule::draem(1e-4, 100, 0.2);
        assert_eq!(s, LrSchedule::MultiStep { lr: 1e-4, milestones: vec![80, 90], gamma: 0.2 });
        assert_eq!(s.lr_at(0), 1e-4);
        assert_eq!(s.lr_at(79), 1e-4);
        assert!((s.lr_at(80) - 2e-5).abs() < 1e-12);
        assert!((s.lr_at(89) - 2e-5).abs() < 1e-12);
        assert!((s.lr_at(90) - 4e-6).abs() < 1e-12);
        assert!((s.lr_at(99) - 4e-6).abs() < 1e-12);
    }

    #[test]
    fn step_schedule_and_validation() {
        let s = LrSchedule::Step { lr: 1.0, every: 10, gamma: 0.5 };
        assert_eq!(s.lr_at(9), 1.0);
        assert_eq!(s.lr_at(10), 0.5);
        assert_eq!(s.lr_at(25), 0.25);
        assert!(LrSchedule::Step { lr: 1.0, every: 0, gamma: 0.5 }.validate().is_err());
        assert!(LrSchedule::Constant { lr: -1.0 }.validate().is_err());
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<LrSchedule>(&json).unwrap(), s);
    }
}
