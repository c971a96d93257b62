//! Run-time choice of instruction set for hot loops.
//!
//! The workspace compiles for baseline x86-64 (SSE2), so that one binary runs on every machine.
//! [`simd_dispatch!`](crate::simd_dispatch) compiles a plain-Rust loop once more with AVX-512 and
//! once more with AVX2 + FMA enabled, and calls the widest the CPU has; the compiler vectorises
//! each copy for its instruction set.

/// Defines `fn $name(args) -> ret` that evaluates `$fast` (an expression over the arguments,
/// usually a call to an `#[inline(always)]` function) compiled with AVX-512 or AVX2 + FMA when
/// the CPU supports them, and `$portable` otherwise. `$fast` may rely on fused multiply-add
/// being a single instruction; `$portable` must not (on a CPU without FMA, `mul_add` is a slow
/// library call).
///
/// ```
/// vigil_core::simd_dispatch! {
///     /// Sum of squares.
///     fn sum_squares(values: &[f32]) -> f32;
///     fast = values.iter().fold(0.0, |a, v| v.mul_add(*v, a));
///     portable = values.iter().map(|v| v * v).sum();
/// }
/// assert_eq!(sum_squares(&[1.0, 2.0]), 5.0);
/// ```
#[macro_export]
macro_rules! simd_dispatch {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;
        fast = $fast:expr;
        portable = $portable:expr;
    ) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $fast
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $fast
                }
                let fma = std::arch::is_x86_feature_detected!("fma");
                if fma && std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features `avx512` was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if fma && std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $portable
        }
    };
}

#[cfg(test)]
mod tests {
    crate::simd_dispatch! {
        fn dot(a: &[f32], b: &[f32]) -> f32;
        fast = a.iter().zip(b).fold(0.0, |s, (x, y)| x.mul_add(*y, s));
        portable = a.iter().zip(b).map(|(x, y)| x * y).sum();
    }

    #[test]
    fn every_path_gives_the_same_exact_sums() {
        let a: Vec<f32> = (0..100).map(|i| i as f32).collect();
        assert_eq!(dot(&a, &a), (0..100).map(|i| (i * i) as f32).sum::<f32>());
    }
}
