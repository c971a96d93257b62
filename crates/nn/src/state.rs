//! Moving weights between burn modules and a [`TensorBag`] under PyTorch-style names
//! (`encoder.block1.0.weight`, BatchNorm `weight`/`bias`/`running_mean`/`running_var`), so a
//! model file reads like a PyTorch state_dict.

use std::collections::BTreeSet;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};
use vigil_core::{Result, TensorBag, VigilError};

/// burn names BatchNorm's affine parameters gamma/beta; PyTorch calls them weight/bias.
fn pytorch_name(path: &[String]) -> String {
    let mut parts: Vec<&str> = path.iter().map(|s| s.as_str()).collect();
    if let Some(last) = parts.last_mut() {
        *last = match *last {
            "gamma" => "weight",
            "beta" => "bias",
            other => other,
        };
    }
    parts.join(".")
}

/// All values of a tensor as f32 (reads the tensor back from its device).
pub fn tensor_to_vec<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 tensor data")
}

/// A tensor of the given shape from f32 values.
pub fn tensor_from_vec<const D: usize>(data: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(data, shape), device)
}

struct BagWriter {
    path: Vec<String>,
    bag: TensorBag,
}

impl ModuleVisitor for BagWriter {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        let shape = value.dims().to_vec();
        self.bag.put_f32(&pytorch_name(&self.path), &shape, tensor_to_vec(value));
    }
}

/// Every float tensor of `module` (parameters and running statistics) under its PyTorch name.
pub fn module_to_bag<M: Module>(module: &M) -> TensorBag {
    // burn's RunningState (BatchNorm statistics) keeps its latest update pending per thread
    // and a visit reads the value before it; `valid()` folds pending updates into the shared
    // state as a side effect, so the bag holds the current statistics.
    let _ = module.valid();
    let mut writer = BagWriter { path: Vec::new(), bag: TensorBag::new() };
    module.visit(&mut writer);
    writer.bag
}

struct BagReader<'a> {
    path: Vec<String>,
    bag: &'a TensorBag,
    prefix: &'a str,
    used: BTreeSet<String>,
    error: Option<VigilError>,
}

impl ModuleMapper for BagReader<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.error.is_some() {
            return param;
        }
        let name = format!("{}{}", self.prefix, pytorch_name(&self.path));
        let current = param.val();
        let shape = current.dims();
        match self.bag.f32(&name, Some(&shape)) {
            Ok(values) => {
                self.used.insert(name);
                let id = param.id;
                let tensor = tensor_from_vec(values, shape, &current.device());
                param.transform_for_load(tensor, id)
            }
            Err(e) => {
                self.error = Some(e);
                param
            }
        }
    }
}

/// Load `module`'s tensors from `bag` (names as [`module_to_bag`] writes them, after `prefix`).
/// Fails on a missing tensor or a shape mismatch; tensors in the bag under `prefix` that the
/// module does not have are an error too, so a mismatched architecture is never half-loaded.
pub fn load_module<M: Module>(module: M, bag: &TensorBag, prefix: &str) -> Result<M> {
    let mut reader = BagReader { path: Vec::new(), bag, prefix, used: BTreeSet::new(), error: None };
    let module = module.map(&mut reader);
    if let Some(e) = reader.error {
        return Err(e);
    }
    if let Some(extra) = bag.names().find(|n| n.starts_with(prefix) && !reader.used.contains(*n)) {
        return Err(VigilError::Model(format!(
            "tensor '{extra}' in the model state has no place in this network (settings and weights disagree)"
        )));
    }
    Ok(module)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_modules::tiny;

    #[test]
    fn round_trip_with_pytorch_names() {
        let device = Device::flex();
        let a = tiny(&device, 2, 3);
        let bag = module_to_bag(&a);
        let names: Vec<&str> = bag.names().collect();
        assert_eq!(
            names,
            ["bn.bias", "bn.running_mean", "bn.running_var", "bn.weight", "conv.bias", "conv.weight"]
        );
        assert_eq!(bag.shape("conv.weight").unwrap(), &[3, 2, 3, 3]);
        let b = load_module(tiny(&device, 2, 3), &bag, "").unwrap();
        assert_eq!(module_to_bag(&b), bag);

        let mut wrong = TensorBag::new();
        wrong.put_f32("conv.weight", &[3, 2, 1, 1], vec![0.0; 6]);
        assert!(load_module(tiny(&device, 2, 3), &wrong, "").unwrap_err().to_string().contains("shape"));
        let mut extra = bag.clone();
        extra.put_f32("head.weight", &[1], vec![0.0]);
        assert!(load_module(tiny(&device, 2, 3), &extra, "")
            .unwrap_err()
            .to_string()
            .contains("head.weight"));
    }
}
