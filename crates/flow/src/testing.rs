//! Test support for flows built from these steps (feature `testing`): the log-determinant of a
//! transform's Jacobian by finite differences, to check an exact log-determinant against.

use burn::tensor::{Device, Tensor, TensorData};

/// log|det| of the Jacobian of `f` at `x` (of `shape`, on the flex device) by central differences
/// of step 10⁻², through an LU in f64; panics if `f` changes the dimension or the Jacobian is singular.
pub fn numerical_log_det(f: impl Fn(Tensor<4>) -> Vec<f32>, x: &[f32], shape: [usize; 4]) -> f64 {
    let n = x.len();
    let eps = 1e-2f32;
    let mut jac = vec![vec![0f64; n]; n];
    for j in 0..n {
        let eval = |delta: f32| {
            let mut xp = x.to_vec();
            xp[j] += delta;
            f(Tensor::from_data(TensorData::new(xp, shape), &Device::flex()))
        };
        let (plus, minus) = (eval(eps), eval(-eps));
        assert_eq!(plus.len(), n, "the transform must preserve dimension");
        for i in 0..n {
            jac[i][j] = (plus[i] as f64 - minus[i] as f64) / (2.0 * eps as f64);
        }
    }
    let mut log_det = 0.0;
    for col in 0..n {
        let pivot = (col..n).max_by(|&a, &b| jac[a][col].abs().total_cmp(&jac[b][col].abs())).unwrap();
        jac.swap(col, pivot);
        let p = jac[col][col];
        assert!(p.abs() > 1e-9, "singular Jacobian");
        log_det += p.abs().ln();
        let (done, rest) = jac.split_at_mut(col + 1);
        let pivot_row = &done[col];
        for row in rest.iter_mut() {
            let factor = row[col] / p;
            for (v, pv) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *v -= factor * pv;
            }
        }
    }
    log_det
}
