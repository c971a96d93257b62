//! Deterministic weight initialisation and parameter identities.
//!
//! burn draws initial weights from its own global RNG and gives parameters random ids; both
//! would make two runs (or a run and its resumption in a new process) differ, and the
//! optimiser state is keyed by parameter id. Here initial values are a pure function of
//! (seed, parameter path) and ids a pure function of the path.

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::tensor::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::state::tensor_from_vec;

/// FNV-1a: a stable 64-bit hash of a parameter path, independent of Rust's hasher seeds.
fn path_hash(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Gaussian samples by Box-Muller (rand 0.8 ships no normal distribution without rand_distr).
fn normal_samples(rng: &mut ChaCha8Rng, n: usize, mean: f32, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = 1.0 - rng.gen::<f64>();
            let u2: f64 = rng.gen::<f64>();
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            mean + std * z as f32
        })
        .collect()
}

struct IdMapper {
    path: Vec<String>,
}

impl ModuleMapper for IdMapper {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let id = ParamId::from(path_hash(&self.path.join(".")));
        let value = param.val();
        param.transform_for_load(value, id)
    }
}

/// Give every parameter an id derived from its path, so optimiser state saved by one process
/// applies to the same network rebuilt by another.
pub fn stable_param_ids<M: Module>(module: M) -> M {
    module.map(&mut IdMapper { path: Vec::new() })
}

struct NormalInit {
    path: Vec<String>,
    seed: u64,
    std: f32,
}

impl ModuleMapper for NormalInit {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.join(".");
        let current = param.val();
        let dims = current.dims();
        let n: usize = dims.iter().product();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ path_hash(&path));
        let leaf = self.path.last().map(|s| s.as_str()).unwrap_or("");
        let values = match (leaf, D) {
            // Convolution kernels: N(0, std).
            ("weight", 4) => normal_samples(&mut rng, n, 0.0, self.std),
            // BatchNorm scale: N(1, std).
            ("gamma", 1) => normal_samples(&mut rng, n, 1.0, self.std),
            ("bias", _) | ("beta", _) => vec![0.0; n],
            // Running statistics and anything else keep their constructor values.
            _ => return param,
        };
        let id = param.id;
        param.transform_for_load(tensor_from_vec(values, dims, &current.device()), id)
    }
}

/// DCGAN/DRAEM initialisation: conv kernels N(0, std), BatchNorm scales N(1, std), biases 0.
/// Values depend only on `seed` and each parameter's path.
pub fn init_normal<M: Module>(module: M, seed: u64, std: f32) -> M {
    module.map(&mut NormalInit { path: Vec::new(), seed, std })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::module_to_bag;
    use crate::test_modules::tiny;
    use burn::tensor::Device;

    #[test]
    fn init_is_a_function_of_the_seed() {
        let device = Device::flex();
        let a = module_to_bag(&init_normal(tiny(&device, 4, 8), 7, 0.02));
        let b = module_to_bag(&init_normal(tiny(&device, 4, 8), 7, 0.02));
        let c = module_to_bag(&init_normal(tiny(&device, 4, 8), 8, 0.02));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let w = a.f32("conv.weight", None).unwrap();
        let mean = w.iter().sum::<f32>() / w.len() as f32;
        let std = (w.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / w.len() as f32).sqrt();
        assert!(mean.abs() < 0.005 && (std - 0.02).abs() < 0.004, "mean {mean} std {std}");
        assert!(a.f32("conv.bias", None).unwrap().iter().all(|&v| v == 0.0));
        let g = a.f32("bn.weight", None).unwrap();
        assert!(g.iter().all(|v| (v - 1.0).abs() < 0.1) && g.iter().any(|&v| v != 1.0));
        assert_eq!(a.f32("bn.running_var", None).unwrap(), vec![1.0; 8]);
    }

    #[test]
    fn ids_depend_only_on_paths() {
        let device = Device::flex();
        let a = stable_param_ids(tiny(&device, 4, 8));
        let b = stable_param_ids(tiny(&device, 4, 8));
        assert_eq!(a.conv.weight.id, b.conv.weight.id);
        assert_ne!(a.conv.weight.id, a.conv.bias.as_ref().unwrap().id);
    }
}
