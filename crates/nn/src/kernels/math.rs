//! Branch-free `exp` and the logistic sigmoid for the element-wise loops of the kernels.
//!
//! `f32::exp` is a library call per value, which keeps the SiLU and softmax loops scalar; this
//! one is plain arithmetic (Cephes' `expf`: range reduction by ln 2 and a degree-6 polynomial,
//! within 2 ulp), so the loops vectorise under the run-time AVX dispatch. Both dispatch paths
//! run the same operations, so the results do not depend on the CPU.

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two so that `k·LN2_HIGH` is exact for the `k` that occur.
const LN2_HIGH: f32 = 0.693_359_4;
const LN2_LOW: f32 = -2.121_944_4e-4;

/// e^x for x in [−87.3, 88.3]; arguments outside are clamped (e^−87.3 ≈ 1.2e−38 stands in for
/// the denormals and zero below, which no sum of a softmax or sigmoid can tell apart).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let k = (x * LOG2_E + 0.5).floor();
    let r = x - k * LN2_HIGH - k * LN2_LOW;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((k as i32 + 127) << 23) as u32)
}

/// 1 / (1 + e^−z).
#[inline(always)]
pub(crate) fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + exp(-z))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_the_library() {
        let mut worst = 0.0f64;
        for i in -87_000..=88_000 {
            let x = i as f32 * 1e-3 + 1.7e-4;
            let (fast, exact) = (f64::from(exp(x)), f64::from(x).exp());
            worst = worst.max((fast - exact).abs() / exact);
        }
        assert!(worst < 3.0 * f64::from(f32::EPSILON), "relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1.3e-38 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn sigmoid_saturates_without_overflow() {
        assert_eq!(sigmoid(100.0), 1.0);
        assert!(sigmoid(-100.0) < 1e-37);
        assert!((sigmoid(0.3) - 1.0 / (1.0 + (-0.3f32).exp())).abs() < 1e-7);
    }
}
